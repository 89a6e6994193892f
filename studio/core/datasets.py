"""Importing and exporting datasets in TRL's standard formats (JSONL, JSON, CSV, Parquet).

Two kinds of dataset are understood:

- "prompts": ``{"prompt": text}`` or ``{"prompt": [messages]}``.
- "preference": ``{"prompt", "chosen", "rejected"}``, all text or all conversational (prompt is a
  message list, chosen/rejected are message lists starting with an assistant message), or the
  implicit-prompt form ``{"chosen": [conversation], "rejected": [conversation]}``, whose shared
  leading messages become the prompt.

A message is ``{"role": "system" | "user" | "assistant" | "tool", "content": text}``; an assistant
message may call functions instead of (or besides) answering (``tool_calls``), and a ``tool`` message
carries a call's result. A preference row may have a ``tools`` column: the JSON schemas of the
functions, kept with the pair and given to the chat template wherever the pair is tokenised (as TRL's
DPOTrainer does). In CSV cells, a value that is a JSON list of objects is read as a message list.
Other columns or keys are ignored.

Every row is checked and every problem is collected as a ``DataError`` naming file, row and field,
so a window can list them all; ``import_file`` stores nothing unless the whole file is clean.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlite_utils import Database

from . import store
from .errors import StudioError

KINDS = ("prompts", "preference")
ROLES = ("system", "user", "assistant", "tool")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FIELDS = ("prompt", "chosen", "rejected")

MAX_FIELD_CHARS = 1_000_000  # one prompt or response; far beyond any context window
# A JSONL line or CSV cell longer than this is rejected without being parsed. It is well above
# three fields at the limit (even fully \u-escaped), so an over-long field is normally reported
# by name instead.
MAX_ROW_BYTES = 64 * 1024 * 1024
MAX_JSON_FILE_BYTES = 2 * 1024**3  # a .json file is parsed whole; JSON Lines files are streamed
MAX_IMPORT_ERRORS = 50  # kept on a DataImportError
SHOWN_ERRORS = 5  # quoted in its message

# Lone surrogates: invalid bytes decoded with "surrogateescape" (U+DC80..U+DCFF), or "\ud800"-style
# JSON escapes. Neither can be written back as UTF-8, so they are rejected where they appear.
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(StudioError):
    """One problem in an input file. row is 1-based (None for the whole file); field may be None."""

    def __init__(self, file: str, row: int | None, field: str | None, message: str):
        super().__init__(file, row, field, message)
        self.file = file
        self.row = row
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}"


class DataImportError(StudioError):
    """A file that was not imported; .errors holds the first MAX_IMPORT_ERRORS problems."""

    def __init__(self, file: str, errors: list[DataError]):
        self.file = file
        self.total = len(errors)
        self.errors = errors[:MAX_IMPORT_ERRORS]
        lines = [f"{file}: {self.total} problem{'s' if self.total != 1 else ''}, nothing imported"]
        lines += [f"  {e}" for e in errors[:SHOWN_ERRORS]]
        if self.total > SHOWN_ERRORS:
            lines.append(f"  ... and {self.total - SHOWN_ERRORS} more")
        super().__init__("\n".join(lines))


@dataclass
class LoadedFile:
    path: str
    fmt: str  # "jsonl" | "json" | "csv" | "parquet"; "" for an unknown extension
    kind: str  # "prompts" | "preference"; "" when no row was valid and no kind was asked for
    rows: list[dict]
    errors: list[DataError] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # every key or column seen, in order of appearance
    trl_format: str = ""  # the TRL dataset format of the first valid row (TRL's name for it)
    feedback: list[dict] = field(default_factory=list)  # unpaired preference rows: prompt, completion, label
    unpaired: int = 0  # feedback rows with no partner of the opposite label for the same prompt
    row_count: int = 0  # valid rows (pairs, for unpaired preference) in the whole file; `rows` may hold fewer

    def column_plan(self) -> list[tuple[str, str]]:
        """(column, what the import does with it) for every column seen; unused ones say 'ignored'."""
        return [(column, COLUMN_USES.get(self.trl_format, {}).get(column, "ignored")) for column in self.columns]

    def summary(self) -> str:
        """One line on what importing this file gives, counts included."""
        if self.feedback:
            return (f"{_count(len(self.feedback), 'unpaired preference row')}: "
                    f"{_count(self.row_count, 'preference pair')} (completions of one prompt with opposite labels), "
                    f"{_count(self.unpaired, 'row')} left unpaired; every row is also kept as unpaired feedback")
        if self.trl_format == "prompt-completion":
            return f"{self.row_count} prompts, each with its completion kept as a reference answer"
        return f"{self.row_count} {self.kind} rows" if self.kind else "nothing to import"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


# --- public API -------------------------------------------------------------------------------

def load_file(path: str | os.PathLike, kind: str | None = None) -> LoadedFile:
    """Read and check every row. Problems are collected in .errors, never raised.

    kind None detects the kind from the first valid row; later rows of the other kind are errors.
    """
    return _load(Path(path), kind, keep_rows=None)


def preview(path: str | os.PathLike, limit: int = 20) -> LoadedFile:
    """Like load_file, but keeps only the first `limit` rows (every row is still checked)."""
    return _load(Path(path), None, keep_rows=limit)


def import_file(db: Database, path: str | os.PathLike, name: str | None = None,
                kind: str | None = None, as_eval: bool = False) -> int:
    """Store a file as a dataset and return its id; raise DataImportError, storing nothing, on any problem."""
    path = Path(path)
    loaded = load_file(path, kind)
    errors = loaded.errors
    if not errors and as_eval and loaded.kind != "prompts":
        errors = [DataError(path.name, None, None,
                            "only prompts can be an evaluation set; this file holds preference pairs "
                            "(import it with kind 'prompts' to use their prompts)")]
    if errors:
        raise DataImportError(path.name, errors)
    return store.add_dataset(db, name or path.stem, loaded.kind, loaded.rows,
                             source_file=str(path.resolve()), fmt=loaded.fmt, is_eval=as_eval,
                             feedback=loaded.feedback)


def export_preference_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write preference records as TRL JSONL, atomically; returns how many were written.

    prompt, chosen and rejected come first; other keys (provenance, ids) are kept as they are.
    A record that would not load back raises DataError (its row is the record's number) and
    leaves `path` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                count += 1
                _check_export_record(record, count, path.name)
                ordered = {"prompt": record["prompt"], "chosen": record["chosen"],
                           "rejected": record["rejected"], **record}
                f.write(json.dumps(ordered, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; an export is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return count


def _check_export_record(record: dict, number: int, file: str) -> None:
    """What is exported must import again, so a bad record stops the export."""
    for key in FIELDS:
        if record.get(key) is None:
            raise DataError(file, number, key, "cannot export: missing")
    _, problems = _preference_record(record)
    if problems:
        raise DataError(file, number, problems[0].field, f"cannot export: {problems[0].message}")


# --- loading: one loop over the rows any reader yields ----------------------------------------

def _load(path: Path, kind: str | None, keep_rows: int | None) -> LoadedFile:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, not {kind!r}")
    name = path.name
    fmt = FORMATS.get(path.suffix.lower(), "")
    if not fmt:
        known = ", ".join(FORMATS)
        return LoadedFile(str(path), "", kind or "", [],
                          [DataError(name, None, None, f"unknown file type {path.suffix!r} (use {known})")])

    problem = _file_problem(path, fmt)
    if problem:
        return LoadedFile(str(path), fmt, kind or "", [], [DataError(name, None, None, problem)])
    rows: list[dict] = []
    errors: list[DataError] = []
    detected: tuple[str, int] | None = None  # (kind, row it was detected from)
    seen, valid = 0, 0
    columns: dict[str, None] = {}  # every key seen, in order
    feedback: list[dict] = []
    first_format = ""
    try:
        for item in _READERS[fmt](path.resolve(), name, kind):
            if isinstance(item, DataError):
                errors.append(item)
                continue
            number, raw = item
            seen += 1
            columns.update(dict.fromkeys(raw))
            if kind is None and detected and detected[0] == "prompts" and _shape(raw) == "preference":
                errors.append(DataError(name, number, None, "a preference pair in a file of prompts "
                                        f"(detected from row {detected[1]})"))
                continue
            row_kind = kind or (detected[0] if detected else _shape(raw))
            record, problems = _trl_record(raw, row_kind)
            errors.extend(DataError(name, number, p.field, p.message) for p in problems)
            if record is None:
                continue
            if kind is None and detected is None:
                detected = (row_kind, number)
            first_format = first_format or trl_format(raw)
            if "label" in record:  # paired up below, once every row is in
                feedback.append(record)
                continue
            valid += 1
            if keep_rows is None or len(rows) < keep_rows:
                rows.append(record)
    except OSError as e:
        errors.append(DataError(name, None, None, f"cannot read the file: {e.strerror or e}"))
    if not seen and not errors:
        errors.append(DataError(name, None, None, "the file is empty" if path.stat().st_size == 0
                                else "the file has no data rows"))
    found_kind = kind or (detected[0] if detected else "")
    pairs, unpaired = pair_feedback(feedback)
    rows += pairs[:max(0, keep_rows - len(rows))] if keep_rows is not None else pairs
    return LoadedFile(str(path), fmt, found_kind, rows, errors, list(columns), first_format, feedback, unpaired,
                      valid + len(pairs))


def _file_problem(path: Path, fmt: str) -> str | None:
    """Why a path cannot be read as a data file, checked before anything is read from it."""
    try:
        info = path.resolve().stat()  # follows links: what matters is what they point at
    except OSError as e:
        return f"cannot read the file: {e.strerror or e}"
    if not stat.S_ISREG(info.st_mode):
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
        return f"not a regular file ({what}); only ordinary files can be imported"
    if fmt == "json" and info.st_size > MAX_JSON_FILE_BYTES:
        return (f"{info.st_size:,} bytes is too large for one JSON document (the limit is "
                f"{MAX_JSON_FILE_BYTES:,}); save it as JSON Lines (.jsonl), one row per line")
    if fmt != "parquet":
        with open(path, "rb") as f:
            start = f.read(4)
        if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (len(start) >= 2 and b"\x00" in start[:2]):
            return ("the file is UTF-16 encoded (its first bytes say so); save it as UTF-8 "
                    "(in most editors: Save As, encoding UTF-8)")
    return None


TOO_DEEP = "values nested too deeply to read (hundreds of levels of [ or {)"


def _shape(raw: dict) -> str:
    """The kind a row looks like on its own."""
    return "preference" if "chosen" in raw or "rejected" in raw or trl_format(raw) == "unpaired preference" else "prompts"


# --- readers: yield (row number, dict) or DataError -------------------------------------------

def _read_jsonl(path: Path, name: str, kind: str | None) -> Iterator[tuple[int, dict] | DataError]:
    with open(path, "rb") as f:
        number = 0
        while True:
            # Bounded read, so a pathological line is never held in memory whole.
            line = f.readline(MAX_ROW_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_ROW_BYTES and not line.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield DataError(name, number, None, f"line is longer than {MAX_ROW_BYTES:,} bytes")
                continue
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            # Bad bytes become lone surrogates and are reported by field in the row check.
            text = line.decode("utf-8", errors="surrogateescape")
            del line
            if not text.strip():
                continue  # blank lines, such as a trailing one, are not rows
            text = text.rstrip("\r\n")  # else an error at the end of a cut line reads "column 1" of the next
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                at_end = ", the end of the line: is it cut short?" if e.pos >= len(text) else ""
                yield DataError(name, number, None, f"invalid JSON: {e.msg} (column {e.colno}{at_end})")
                continue
            except RecursionError:
                yield DataError(name, number, None, TOO_DEEP)
                continue
            if not isinstance(value, dict):
                yield DataError(name, number, None, f"expected a JSON object, got {_type_name(value)}")
                continue
            yield number, value


def _skip_rest_of_line(f) -> None:
    while True:
        chunk = f.readline(1024 * 1024)
        if not chunk or chunk.endswith(b"\n"):
            return


def _read_json(path: Path, name: str, kind: str | None) -> Iterator[tuple[int, dict] | DataError]:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    text = data.decode("utf-8", errors="surrogateescape")
    del data
    if not text.strip():
        return  # the caller reports the empty file
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if e.msg == "Extra data" else ""
        yield DataError(name, None, None, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}")
        return
    except RecursionError:
        yield DataError(name, None, None, TOO_DEEP)
        return
    if not isinstance(value, list):
        yield DataError(name, None, None, f"expected a list of objects at the top level, got {_type_name(value)}")
        return
    for number, item in enumerate(value, 1):
        if isinstance(item, dict):
            yield number, item
        else:
            yield DataError(name, number, None, f"expected an object, got {_type_name(item)}")


def _read_csv(path: Path, name: str, kind: str | None) -> Iterator[tuple[int, dict] | DataError]:
    # The csv module's default cell limit (128 KiB) is below MAX_FIELD_CHARS; raise it so long
    # cells reach the row check and are reported by field.
    old_limit = csv.field_size_limit(MAX_ROW_BYTES)
    number = 0
    try:
        # utf-8-sig drops the BOM spreadsheet programs write; bad bytes are reported by the row check.
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return  # the caller reports the empty file
            columns = [column.strip() for column in header]
            problem = _check_columns(columns, kind, name)
            if problem:
                yield problem
                return
            index = {key: columns.index(key) for key in dict.fromkeys(columns)}  # every column: the preview lists them
            for cells in reader:
                if not cells:
                    continue  # a blank line is not a data row
                number += 1
                if len(cells) != len(columns):
                    yield DataError(name, number, None,
                                    f"{len(cells)} cells, but the header has {len(columns)} columns")
                    continue
                try:
                    yield number, {key: _csv_cell(cells[i], key) for key, i in index.items()}
                except _Invalid as e:
                    yield DataError(name, number, e.field, e.message)
    except csv.Error as e:
        yield DataError(name, number + 1, None, f"cannot read CSV: {e}")
    finally:
        csv.field_size_limit(old_limit)


def _csv_cell(text: str, key: str) -> Any:
    """A cell's value: a message list if it is a JSON list of objects, else the text as it is."""
    if not text.lstrip().startswith("["):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise _Invalid(key, TOO_DEEP) from None
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    return text


def _read_parquet(path: Path, name: str, kind: str | None) -> Iterator[tuple[int, dict] | DataError]:
    import pyarrow as pa  # imported here: it is slow to import and only Parquet needs it
    import pyarrow.parquet as pq

    number = 0
    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        problem = _check_columns(columns, kind, name)
        if problem:
            yield problem
            return
        wanted = [key for key in (*FIELDS, "completion", "label", "tools") if key in columns]
        for batch in parquet.iter_batches(columns=wanted, batch_size=1024):
            for raw in batch.to_pylist():
                number += 1
                yield number, raw
    except pa.ArrowException as e:
        where = "" if number == 0 else f" after row {number}"
        yield DataError(name, None, None, f"cannot read Parquet{where}: {e}")


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _check_columns(columns: list[str], kind: str | None, name: str) -> DataError | None:
    """For tables (CSV, Parquet): the columns the kind needs, once for the whole file."""
    shape = trl_format(dict.fromkeys(columns))
    if shape == "language modeling" and kind != "prompts":
        return DataError(name, None, None, LANGUAGE_MODELING.replace("row", "file", 1))
    if kind is None:
        kind = _shape(dict.fromkeys(columns))
    needed = (("prompt", "completion", "label") if shape == "unpaired preference" and kind == "preference"
              else ("chosen", "rejected") if kind == "preference" else ("prompt",))
    for key in needed:
        if key not in columns:
            found = ", ".join(repr(c) for c in columns) or "none"
            return DataError(name, None, key, f"missing column (columns found: {found})")
    for key in FIELDS:
        if columns.count(key) > 1:
            return DataError(name, None, key, "the column appears more than once")
    return None


# --- TRL's dataset formats: which one a row is in, and what the import makes of it -------------

PAIR_COLUMNS = {"prompt": "the prompt", "chosen": "the preferred response", "rejected": "the other response",
                "tools": "function schemas, kept with the pair and given to the chat template (tools=...) "
                         "wherever the pair is tokenised"}
COLUMN_USES = {  # TRL format -> column -> what the import does with it
    "prompt-only": {"prompt": "the prompt"},
    "prompt-completion": {"prompt": "the prompt",
                          "completion": "kept as the prompt's reference answer (compare view, a pair's chosen side)"},
    "preference": PAIR_COLUMNS,
    "unpaired preference": {"prompt": "the prompt",
                            "completion": "kept as unpaired feedback; paired with a completion of the same "
                                          "prompt with the opposite label",
                            "label": "True: a good completion (the chosen side of its pairs), False: a bad one"},
}
LANGUAGE_MODELING = ("a language-modeling row ('messages' or 'text', no 'prompt'): TRL trains on these with "
                     "SFT, which the studio does not do. The studio trains on prompts (PPO, GRPO, RLOO) and "
                     "preference pairs (DPO): to shape on these conversations, give each row a 'prompt' (the "
                     "messages up to the last user turn) and import it as prompts")


def trl_format(raw: dict) -> str:
    """The TRL dataset format a row is in, by TRL's names for them."""
    if "label" in raw and "completion" in raw:
        return "unpaired preference"
    if "chosen" in raw or "rejected" in raw:
        return "preference"
    if "completion" in raw:
        return "prompt-completion"
    if "prompt" in raw:
        return "prompt-only"
    if "messages" in raw or "text" in raw:
        return "language modeling"
    return "unknown"


def _trl_record(raw: dict, kind: str) -> tuple[dict | None, list["_Invalid"]]:
    """The record of a row of the given kind, in whichever TRL format it comes."""
    row_format = trl_format(raw)
    if row_format == "language modeling":
        return None, [_Invalid(None, LANGUAGE_MODELING)]
    if kind == "preference":
        return _feedback_record(raw) if row_format == "unpaired preference" else _preference_record(raw)
    record, problems = _prompt_record(raw)
    if record is not None and row_format == "prompt-completion":
        try:
            record["reference"] = _completion_value(raw, record["prompt"])
        except _Invalid as e:
            return None, [e]
    return record, problems


def _completion_value(raw: dict, prompt: Any) -> str | list[dict]:
    """A completion: text after a text prompt, assistant messages after a conversational one."""
    completion = _field_value(raw, "completion")
    if isinstance(completion, list) != isinstance(prompt, list):
        raise _Invalid("completion", "is a list of messages, but the prompt is text" if isinstance(completion, list)
                       else "is text, but the prompt is a list of messages")
    if isinstance(completion, list):
        _check_response(completion, "completion")
    return completion


def _feedback_record(raw: dict) -> tuple[dict | None, list["_Invalid"]]:
    try:
        prompt = _field_value(raw, "prompt")
        completion = _completion_value(raw, prompt)
    except _Invalid as e:
        return None, [e]
    label = raw["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are text
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        return None, [_Invalid("label", f"expected true or false, got {_type_name(label)}")]
    return {"prompt": prompt, "completion": completion, "label": label}, []


def has_tool_calls(pair: dict) -> bool:
    """Whether a pair comes with function schemas or its responses call functions (an assistant
    message with tool_calls, a tool result): what a single answer text cannot hold."""
    responses = [pair[side] for side in ("chosen", "rejected") if isinstance(pair[side], list)]
    return bool(pair.get("tools")) or any("tool_calls" in message or message["role"] == "tool"
                                          for response in responses for message in response)


def pair_feedback(feedback: list[dict]) -> tuple[list[dict], int]:
    """(preference pairs, rows left unpaired): within each prompt, the k-th good completion is paired
    with the k-th bad one, in file order; each row is in one pair at most."""
    groups: dict[str, tuple[list, list]] = {}
    for row in feedback:
        groups.setdefault(json.dumps(row["prompt"], sort_keys=True), ([], []))[0 if row["label"] else 1].append(row)
    pairs = [{"prompt": good["prompt"], "chosen": good["completion"], "rejected": bad["completion"]}
             for goods, bads in groups.values() for good, bad in zip(goods, bads)]
    return pairs, len(feedback) - 2 * len(pairs)


# --- checking one row -------------------------------------------------------------------------

class _Invalid(Exception):
    """One field's problem; the caller adds file and row."""

    def __init__(self, field: str | None, message: str):
        super().__init__(field, message)
        self.field = field
        self.message = message


def _prompt_record(raw: dict) -> tuple[dict | None, list[_Invalid]]:
    try:
        if _tools_value(raw):
            raise _Invalid("tools", "tool schemas are kept with preference pairs only: shaping runs (PPO, GRPO, "
                                    "RLOO) sample without tools. Import the file as preference pairs, or drop "
                                    "the column to use its prompts without the tools")
        return {"prompt": _field_value(raw, "prompt")}, []
    except _Invalid as e:
        return None, [e]


def _preference_record(raw: dict) -> tuple[dict | None, list[_Invalid]]:
    implicit = raw.get("prompt") is None
    values, problems = {}, []
    for key in ("chosen", "rejected") if implicit else FIELDS:
        try:
            values[key] = _field_value(raw, key)
        except _Invalid as e:
            problems.append(e)
    if problems:
        return None, problems
    try:
        if implicit:
            values = _split_implicit_prompt(values["chosen"], values["rejected"])
        else:
            _check_same_style(values)
        tools = _tools_value(raw)
        return {**values, "tools": tools} if tools else values, []
    except _Invalid as e:
        return None, [e]


TOOL_SCHEMA = '{"type": "function", "function": {"name": ..., "parameters": ...}}'


def _tools_value(raw: dict) -> list[dict] | None:
    """A row's function schemas (a list, or JSON text of one, as TRL reads them); None when it has none."""
    tools = raw.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        _check_text(tools, "tools", "value")
        tools = _json_value(tools, "tools", "the value")
    if tools is None or tools == []:  # TRL too passes no tools for [] (Llama's template misrenders it)
        return None
    if not isinstance(tools, list):
        raise _Invalid("tools", f"expected a list of function schemas, got {_type_name(tools)}")
    for number, tool in enumerate(tools, 1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"].strip()):
            raise _Invalid("tools", f"tool {number} is not a function schema ({TOOL_SCHEMA})")
    size = len(json.dumps(tools))
    if size > MAX_FIELD_CHARS:
        raise _Invalid("tools", f"the schemas hold {size:,} characters; the limit is {MAX_FIELD_CHARS:,}")
    return tools


def _json_value(text: str, key: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _Invalid(key, f"{what} is not valid JSON ({e.msg} at character {e.pos + 1})") from None
    except RecursionError:
        raise _Invalid(key, TOO_DEEP) from None


def _check_same_style(values: dict) -> None:
    """TRL needs prompt, chosen and rejected all text or all conversational."""
    conversational = isinstance(values["prompt"], list)
    for key in ("chosen", "rejected"):
        if isinstance(values[key], list) != conversational:
            if conversational:
                raise _Invalid(key, "is text, but the prompt is a list of messages")
            raise _Invalid(key, "is a list of messages, but the prompt is text")
        if conversational:
            _check_response(values[key], key)


def _split_implicit_prompt(chosen: Any, rejected: Any) -> dict:
    """Full conversations: the shared leading messages are the prompt, the rest the responses."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise _Invalid("prompt", "missing (without a prompt, chosen and rejected must both be full "
                                 "conversations, lists of messages that start with the prompt)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _Invalid("prompt", "missing, and chosen and rejected share no leading messages to use as one")
    record = {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    for key in ("chosen", "rejected"):
        if not record[key]:
            raise _Invalid(key, "empty value: no messages after the prompt it shares with the other response")
        _check_response(record[key], key)
    return record


def _check_response(messages: list[dict], key: str) -> None:
    if messages[0]["role"] != "assistant":
        raise _Invalid(key, f"a response must start with an assistant message, not {messages[0]['role']!r}")


def _field_value(raw: dict, key: str) -> str | list[dict]:
    """A field as checked text or a checked, normalised message list."""
    if key not in raw:
        raise _Invalid(key, "missing")
    value = raw[key]
    if value is None:
        raise _Invalid(key, "missing value (null)")
    if isinstance(value, str):
        _check_text(value, key, "value")
        return value
    if isinstance(value, list):
        return _check_messages(value, key)
    raise _Invalid(key, f"expected text or a list of messages, got {_type_name(value)}")


def _check_messages(value: list, key: str) -> list[dict]:
    if not value:
        raise _Invalid(key, "empty value (no messages)")
    messages = [_check_message(message, key, i) for i, message in enumerate(value, 1)]
    total = sum(map(_message_chars, messages))
    if total > MAX_FIELD_CHARS:
        raise _Invalid(key, f"messages hold {total:,} characters; the limit is {MAX_FIELD_CHARS:,}")
    return messages


def _message_chars(message: dict) -> int:
    calls = message.get("tool_calls")
    return len(message["content"]) + len(message.get("thinking", "")) + (len(json.dumps(calls)) if calls else 0)


def _check_message(message: Any, key: str, i: int) -> dict:
    """One message as it is stored: role and content, and what the chat template renders besides
    (a reasoning trace, function calls, the call a tool result answers); other keys are dropped."""
    if not isinstance(message, dict):
        raise _Invalid(key, f"message {i} is {_type_name(message)}, not an object with 'role' and 'content'")
    role, content, calls = message.get("role"), message.get("content"), message.get("tool_calls")
    if role is None:
        raise _Invalid(key, f"message {i} has no 'role'")
    if role not in ROLES:
        raise _Invalid(key, f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if calls is not None and role != "assistant":
        raise _Invalid(key, f"message {i} is a {role!r} message with 'tool_calls'; only an assistant calls functions")
    if content is None and calls is None:
        raise _Invalid(key, f"message {i} has no 'content'" + (" (a tool message holds the call's result)"
                                                             if role == "tool" else ""))
    if content is not None and not isinstance(content, str):
        raise _Invalid(key, f"message {i} content must be text, got {_type_name(content)}")
    if content is not None and (calls is None or content.strip()):
        _check_text(content, key, f"content of message {i}")
    # A call-only message gets empty content: every reader of a stored message can rely on its content.
    record = {"role": role, "content": content or ""}
    if isinstance(message.get("thinking"), str):  # a harmony-style reasoning trace
        record["thinking"] = message["thinking"]
    if calls is not None:
        record["tool_calls"] = _check_tool_calls(calls, key, i)
    for part in ("name", "tool_call_id"):  # which function a tool message answers
        if role == "tool" and isinstance(message.get(part), str):
            record[part] = message[part]
    return record


def _check_tool_calls(calls: Any, key: str, i: int) -> list[dict]:
    """Function calls as chat templates read them: arguments an object (JSON text of one is parsed)."""
    if not isinstance(calls, list) or not calls:
        raise _Invalid(key, f"message {i} 'tool_calls' must be a non-empty list of calls, got {_type_name(calls)}")
    checked = []
    for j, call in enumerate(calls, 1):
        where = f"message {i} tool call {j}"
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"].strip()):
            raise _Invalid(key, f"{where} is not a function call "
                                '({"type": "function", "function": {"name": ..., "arguments": {...}}})')
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json_value(arguments, key, f"{where} ({function['name']}): 'arguments'")
        if not isinstance(arguments, dict):
            raise _Invalid(key, f"{where} ({function['name']}): 'arguments' must be an object of named "
                                f"values, got {_type_name(arguments)}")
        record = {"type": call.get("type") or "function",
                  "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):  # what a tool message's tool_call_id refers to
            record["id"] = call["id"]
        checked.append(record)
    return checked


def _check_text(text: str, key: str, what: str) -> None:
    # Length first: it is free, and the checks after it scan the text.
    if len(text) > MAX_FIELD_CHARS:
        raise _Invalid(key, f"{what} is {len(text):,} characters long; the limit is {MAX_FIELD_CHARS:,}")
    if not text.strip():
        raise _Invalid(key, f"empty {what}")
    bad = _SURROGATE.search(text)
    if bad:
        code = ord(bad.group())
        if 0xDC80 <= code <= 0xDCFF:
            problem = f"byte 0x{code - 0xDC00:02X}, which is not valid UTF-8,"
        else:
            problem = f"an unpaired surrogate U+{code:04X}, which is not text,"
        raise _Invalid(key, f"{what} has {problem} at character {bad.start() + 1}")


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return type(value).__name__

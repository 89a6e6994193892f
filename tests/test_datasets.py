"""Data import and export: every format x every kind, every bad input, atomicity, round trips."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlite_utils
from hypothesis import given, settings, strategies as st

from studio.core import datasets, store
from studio.core.datasets import (DataError, DataImportError, export_preference_jsonl, import_file,
                                  load_file, preview)
from studio.core.errors import StudioError
from studio.core.store import Project


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer briefly."}

# Each case: (rows as written to the file, kind, records expected back). Every written row has an
# extra "source" column, which must not reach the records.
CASES = {
    "prompts-text": (
        [{"prompt": "What is 2+2?", "source": "a"}, {"prompt": "Name a colour.", "source": "b"}],
        "prompts",
        [{"prompt": "What is 2+2?"}, {"prompt": "Name a colour."}],
    ),
    "prompts-conversational": (
        [{"prompt": [SYSTEM, user("Hi")], "source": "a"}, {"prompt": [user("Bye")], "source": "b"}],
        "prompts",
        [{"prompt": [SYSTEM, user("Hi")]}, {"prompt": [user("Bye")]}],
    ),
    "preference-standard": (
        [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "a"},
         {"prompt": "Sky?", "chosen": "Blue, \"mostly\"\nby day.", "rejected": "Green", "source": "b"}],
        "preference",
        [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
         {"prompt": "Sky?", "chosen": "Blue, \"mostly\"\nby day.", "rejected": "Green"}],
    ),
    "preference-conversational": (
        [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")], "source": "a"},
         {"prompt": [SYSTEM, user("Sky?")], "chosen": [assistant("Blue")], "rejected": [assistant("Green")],
          "source": "b"}],
        "preference",
        [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
         {"prompt": [SYSTEM, user("Sky?")], "chosen": [assistant("Blue")], "rejected": [assistant("Green")]}],
    ),
    "preference-implicit": (
        [{"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")], "source": "a"},
         {"chosen": [SYSTEM, user("Sky?"), assistant("Blue")],
          "rejected": [SYSTEM, user("Sky?"), assistant("Green")], "source": "b"}],
        "preference",
        [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
         {"prompt": [SYSTEM, user("Sky?")], "chosen": [assistant("Blue")], "rejected": [assistant("Green")]}],
    ),
}


# --- writing test files -----------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Message lists go in as JSON text, as a spreadsheet user would paste them."""
    columns = list(rows[0])
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in (row[c] for c in columns)])
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}


def write(tmp_path: Path, fmt: str, rows: list[dict], stem: str = "data") -> Path:
    return WRITERS[fmt](tmp_path / f"{stem}.{fmt}", rows)


@pytest.fixture
def empty_project(tmp_path):
    """A new project with no datasets (conftest's `project` comes with eval prompts)."""
    project = Project.create(tmp_path / "p")
    yield project
    project.close()


def counts(db) -> tuple[int, int, int]:
    return tuple(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("datasets", "prompts", "pairs"))


def only_error(loaded) -> DataError:
    assert len(loaded.errors) == 1, [str(e) for e in loaded.errors]
    return loaded.errors[0]


# --- every format x every kind ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("case", list(CASES))
def test_import_every_format_and_kind(empty_project, tmp_path, fmt, case):
    written, kind, expected = CASES[case]
    path = write(tmp_path, fmt, written, stem=case)

    loaded = load_file(path)
    assert loaded.errors == []
    assert (loaded.fmt, loaded.kind) == (fmt, kind)
    assert loaded.rows == expected  # the extra "source" column is gone

    dataset_id = import_file(empty_project.db, path)
    [dataset] = store.datasets(empty_project.db)
    assert dataset["id"] == dataset_id
    assert (dataset["name"], dataset["kind"], dataset["format"], dataset["row_count"]) == (case, kind, fmt, 2)
    assert dataset["source_file"] == str(path.resolve())
    if kind == "prompts":
        stored = [{"prompt": r["prompt"]} for r in store.prompts(empty_project.db)]
    else:
        stored = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in store.pairs(empty_project.db)]
    assert stored == expected


def test_kind_is_detected_per_file_and_other_kinds_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "a"}, {"prompt": "b", "chosen": "c", "rejected": "d"}, {"prompt": "e"}])
    loaded = load_file(path)
    assert loaded.kind == "prompts"
    assert [r["prompt"] for r in loaded.rows] == ["a", "e"]
    error = only_error(loaded)
    assert error.row == 2 and "preference pair" in str(error) and "row 1" in error.message

    path = write_jsonl(tmp_path / "mixed2.jsonl", [{"prompt": "b", "chosen": "c", "rejected": "d"}, {"prompt": "a"}])
    loaded = load_file(path)
    assert loaded.kind == "preference"
    assert [str(e) for e in loaded.errors] == ["mixed2.jsonl, row 2, field 'chosen': missing",
                                               "mixed2.jsonl, row 2, field 'rejected': missing"]


def test_detection_skips_invalid_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "x", "chosen": "c", "rejected": "r"}])
    loaded = load_file(path)
    assert loaded.kind == "preference"
    assert str(only_error(loaded)) == "p.jsonl, row 1, field 'prompt': empty value"


def test_explicit_prompts_kind_takes_the_prompts_of_a_preference_file(empty_project, tmp_path):
    path = write_csv(tmp_path / "pairs.csv", CASES["preference-standard"][0])
    loaded = load_file(path, kind="prompts")
    assert loaded.errors == [] and loaded.kind == "prompts"
    assert loaded.rows == [{"prompt": "2+2?"}, {"prompt": "Sky?"}]

    import_file(empty_project.db, path, name="evals", kind="prompts", as_eval=True)
    assert [p["prompt"] for p in store.eval_prompts(empty_project.db)] == ["2+2?", "Sky?"]
    assert store.datasets(empty_project.db)[0]["name"] == "evals"


def test_explicit_preference_kind_on_a_prompt_file_is_an_error(tmp_path):
    path = write_csv(tmp_path / "prompts.csv", CASES["prompts-text"][0])
    error = only_error(load_file(path, kind="preference"))
    assert str(error).startswith("prompts.csv, field 'chosen': missing column")


def test_unknown_kind_argument_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        load_file(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}]), kind="pairs")


def test_preference_file_cannot_be_an_eval_set(empty_project, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", CASES["preference-standard"][0])
    with pytest.raises(DataImportError, match="only prompts can be an evaluation set"):
        import_file(empty_project.db, path, as_eval=True)
    assert counts(empty_project.db) == (0, 0, 0)


def test_prompts_import_as_eval_set(empty_project, tmp_path):
    import_file(empty_project.db, write_jsonl(tmp_path / "train.jsonl", [{"prompt": "t"}]))
    import_file(empty_project.db, write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e"}]), as_eval=True)
    assert [p["prompt"] for p in store.eval_prompts(empty_project.db)] == ["e"]
    assert [p["prompt"] for p in store.prompts(empty_project.db, train_only=True)] == ["t"]


def test_csv_with_bom_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt , chosen,rejected\r\np,c,r\r\n\r\np2,\"c,2\",r2\r\n")
    loaded = load_file(path)
    assert loaded.errors == []
    assert loaded.rows == [{"prompt": "p", "chosen": "c", "rejected": "r"},
                           {"prompt": "p2", "chosen": "c,2", "rejected": "r2"}]


def test_csv_cell_that_is_not_a_message_list_stays_text(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"prompt": "[1] Cite this", "chosen": "[1, 2]", "rejected": "[x"}])
    assert load_file(path).rows == [{"prompt": "[1] Cite this", "chosen": "[1, 2]", "rejected": "[x"}]


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": ""}\n')
    assert str(only_error(load_file(path))) == "gaps.jsonl, row 4, field 'prompt': empty value"


# --- bad input: each names file, row and field ------------------------------------------------

def test_invalid_json_on_line_37(empty_project, tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) for i in range(1, 41)]
    lines[36] = '{"prompt": "p37", "chosen": "c" "rejected": "r"}'
    path.write_text("\n".join(lines) + "\n")

    loaded = load_file(path)
    error = only_error(loaded)
    assert (error.file, error.row, error.field) == ("pairs.jsonl", 37, None)
    assert str(error).startswith("pairs.jsonl, row 37: invalid JSON")
    assert len(loaded.rows) == 39

    with pytest.raises(DataImportError) as info:
        import_file(empty_project.db, path)
    assert "pairs.jsonl, row 37: invalid JSON" in str(info.value)
    assert counts(empty_project.db) == (0, 0, 0)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "x"}\n["prompt", "y"]\n')
    assert str(only_error(load_file(path))) == "a.jsonl, row 2: expected a JSON object, got a list"


def test_jsonl_row_missing_chosen(empty_project, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "rejected": "r"}])
    error = only_error(load_file(path))
    assert (error.row, error.field) == (2, "chosen")
    assert str(error) == "pairs.jsonl, row 2, field 'chosen': missing"
    with pytest.raises(DataImportError, match=r"pairs.jsonl, row 2, field 'chosen': missing"):
        import_file(empty_project.db, path)


def test_csv_header_missing_rejected(empty_project, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,notes\np,c,n\n")
    error = only_error(load_file(path))
    assert (error.file, error.row, error.field) == ("pairs.csv", None, "rejected")
    assert str(error).startswith("pairs.csv, field 'rejected': missing column")
    assert "'notes'" in error.message  # says what the file does have
    with pytest.raises(DataImportError, match="pairs.csv, field 'rejected': missing column"):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (0, 0, 0)


def test_csv_without_any_known_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer\nq,a\n")
    assert str(only_error(load_file(path))).startswith("x.csv, field 'prompt': missing column")


def test_csv_duplicate_column(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("prompt,chosen,rejected,chosen\np,c,r,c2\n")
    assert str(only_error(load_file(path))) == "dup.csv, field 'chosen': the column appears more than once"


def test_csv_row_with_wrong_cell_count(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\np,c\n")
    assert str(only_error(load_file(path))) == "ragged.csv, row 2: 2 cells, but the header has 3 columns"


def test_parquet_missing_column(empty_project, tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", [{"prompt": "p", "chosen": "c"}])
    error = only_error(load_file(path))
    assert (error.file, error.row, error.field) == ("pairs.parquet", None, "rejected")
    assert str(error).startswith("pairs.parquet, field 'rejected': missing column")
    with pytest.raises(DataImportError, match="pairs.parquet, field 'rejected'"):
        import_file(empty_project.db, path)


@pytest.mark.parametrize("empty", [
    "", "   ", "\n\t", [], [{"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "ok"}, {"role": "assistant", "content": " \n"}],
])
def test_empty_chosen_jsonl(empty_project, tmp_path, empty):
    prompt = "p" if isinstance(empty, str) else [user("p")]
    rejected = "r" if isinstance(empty, str) else [assistant("r")]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": prompt, "chosen": "c" if isinstance(empty, str) else [assistant("c")], "rejected": rejected},
        {"prompt": prompt, "chosen": empty, "rejected": rejected},
    ])
    error = only_error(load_file(path))
    assert (error.row, error.field) == (2, "chosen")
    assert str(error).startswith("pairs.jsonl, row 2, field 'chosen': empty")
    with pytest.raises(DataImportError, match=r"pairs.jsonl, row 2, field 'chosen': empty"):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_empty_chosen_other_formats(tmp_path, fmt):
    path = write(tmp_path, fmt, [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                 {"prompt": "p", "chosen": "c", "rejected": "r"},
                                 {"prompt": "p", "chosen": "  ", "rejected": "r"}], stem="pairs")
    assert str(only_error(load_file(path))) == f"pairs.{fmt}, row 3, field 'chosen': empty value"


def test_null_value_is_missing(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                                   {"prompt": "p", "chosen": None, "rejected": "r"}])
    assert str(only_error(load_file(path))) == "n.parquet, row 2, field 'chosen': missing value (null)"


def test_non_utf8_byte_jsonl(empty_project, tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
    path.write_bytes(good * 2 + b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "r"}\n' + good)
    loaded = load_file(path)
    error = only_error(loaded)
    assert (error.row, error.field) == (3, "chosen")
    assert str(error).startswith("pairs.jsonl, row 3, field 'chosen':")
    assert "0xE9" in error.message and "UTF-8" in error.message and "character 4" in error.message
    assert len(loaded.rows) == 3
    with pytest.raises(DataImportError, match="pairs.jsonl, row 3, field 'chosen'"):
        import_file(empty_project.db, path)


def test_non_utf8_byte_outside_a_string_is_invalid_json(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "p"}\n{"prompt": "p"\xff}\n')
    assert str(only_error(load_file(path))).startswith("a.jsonl, row 2: invalid JSON")


def test_non_utf8_byte_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"prompt,chosen,rejected\np,c,r\np,c,\xff\xfebad\n")
    error = only_error(load_file(path))
    assert str(error).startswith("pairs.csv, row 2, field 'rejected':") and "0xFF" in error.message


def test_non_utf8_byte_json(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(b'[{"prompt": "ok"},\n {"prompt": "\x80"}]')
    error = only_error(load_file(path))
    assert str(error).startswith("pairs.json, row 2, field 'prompt':") and "0x80" in error.message


def test_non_utf8_byte_in_a_message(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"prompt": [{"role": "user", "content": "\xc3("}]}\n')
    error = only_error(load_file(path))
    assert str(error).startswith("c.jsonl, row 1, field 'prompt': content of message 1 has byte 0xC3")


def test_unpaired_surrogate_escape_is_rejected(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "ab\\ud800"}\n')
    error = only_error(load_file(path))
    assert str(error).startswith("s.jsonl, row 1, field 'prompt':") and "U+D800" in error.message


def test_50_mb_field_is_rejected(empty_project, tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
        f.write(b'{"prompt": "p", "chosen": "' + b"a" * 50_000_000 + b'", "rejected": "r"}\n')
    loaded = load_file(path)
    error = only_error(loaded)
    assert (error.row, error.field) == (2, "chosen")
    assert str(error).startswith("huge.jsonl, row 2, field 'chosen': value is 50,000,000 characters long")
    with pytest.raises(DataImportError, match="huge.jsonl, row 2, field 'chosen'"):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (0, 0, 0)


def test_50_mb_csv_cell_is_rejected(tmp_path):
    path = tmp_path / "huge.csv"
    with open(path, "wb") as f:
        f.write(b"prompt,chosen,rejected\n" + b"p," + b"a" * 50_000_000 + b",r\np,c,r\n")
    loaded = load_file(path)
    assert str(only_error(loaded)).startswith("huge.csv, row 1, field 'chosen': value is 50,000,000 characters")
    assert loaded.rows == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_field_limit_boundary(tmp_path, fmt):
    limit = datasets.MAX_FIELD_CHARS
    path = write(tmp_path, fmt, [{"prompt": "x" * limit}, {"prompt": "y" * (limit + 1)}], stem="long")
    loaded = load_file(path)
    assert loaded.rows == [{"prompt": "x" * limit}]
    assert str(only_error(loaded)).startswith(f"long.{fmt}, row 2, field 'prompt': value is 1,000,001 characters")


def test_message_list_over_the_limit(tmp_path):
    half = datasets.MAX_FIELD_CHARS // 2 + 1
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [user("a" * half), user("b" * half)]}])
    assert "limit" in str(only_error(load_file(path)))


def test_line_over_the_row_limit_is_skipped_unparsed(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_ROW_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text('{"prompt": "a"}\n' + json.dumps({"prompt": "b" * 5000}) + '\n{"prompt": "c"}\n')
    loaded = load_file(path)
    assert str(only_error(loaded)) == "long.jsonl, row 2: line is longer than 1,000 bytes"
    assert loaded.rows == [{"prompt": "a"}, {"prompt": "c"}]


@pytest.mark.parametrize("chosen, message", [
    (["hello"], "message 1 is text, not an object with 'role' and 'content'"),
    ([assistant("ok"), 7], "message 2 is a number (7), not an object"),
    ([{"role": "assistant"}], "message 1 has no 'content'"),
    ([{"content": "hi"}], "message 1 has no 'role'"),
    ([{"role": "robot", "content": "hi"}], "message 1 has unknown role 'robot'"),
    ([{"role": "assistant", "content": 5}], "message 1 content must be text, got a number (5)"),
    ([{"role": "assistant", "content": ["a"]}], "message 1 content must be text, got a list"),
    ({"role": "assistant", "content": "hi"}, "expected text or a list of messages, got an object"),
    ([user("hi")], "a response must start with an assistant message, not 'user'"),
    ("plain text", "is text, but the prompt is a list of messages"),
])
def test_bad_message_structure(empty_project, tmp_path, chosen, message):
    path = write_jsonl(tmp_path / "conv.jsonl", [
        CASES["preference-conversational"][0][0],
        {"prompt": [user("q")], "chosen": chosen, "rejected": [assistant("r")]},
    ])
    error = only_error(load_file(path))
    assert str(error).startswith("conv.jsonl, row 2, field 'chosen': " + message)
    with pytest.raises(DataImportError, match="conv.jsonl, row 2, field 'chosen'"):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (0, 0, 0)


def test_message_list_with_text_prompt(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": "q", "chosen": "c", "rejected": [assistant("r")]}])
    assert str(only_error(load_file(path))) == \
        "mix.jsonl, row 1, field 'rejected': is a list of messages, but the prompt is text"


def test_bad_messages_in_csv_cell(tmp_path):
    path = write_csv(tmp_path / "conv.csv", [{"prompt": [{"role": "human", "content": "q"}], "chosen": [assistant("c")],
                                             "rejected": [assistant("r")]}])
    assert str(only_error(load_file(path))).startswith("conv.csv, row 1, field 'prompt': message 1 has unknown role 'human'")


@pytest.mark.parametrize("value, shown", [
    (42, "a number (42)"), (1.5, "a number (1.5)"), (True, "true/false"), ({"text": "x"}, "an object")])
def test_wrong_type(empty_project, tmp_path, value, shown):
    path = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "ok"}, {"prompt": value}])
    error = only_error(load_file(path))
    assert str(error) == f"types.jsonl, row 2, field 'prompt': expected text or a list of messages, got {shown}"
    with pytest.raises(DataImportError, match="types.jsonl, row 2, field 'prompt'"):
        import_file(empty_project.db, path)


def test_wrong_type_parquet_column(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [{"prompt": "p", "chosen": 1, "rejected": "r"}])
    assert str(only_error(load_file(path))) == \
        "n.parquet, row 1, field 'chosen': expected text or a list of messages, got a number (1)"


def test_several_problems_in_one_row_are_all_reported(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"prompt": 3, "chosen": "", "rejected": "r"}])
    loaded = load_file(path)
    assert sorted(e.field for e in loaded.errors) == ["chosen", "prompt"]
    assert all(e.row == 1 for e in loaded.errors)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n  \n\n", "the file has no data rows"),
    ("empty.json", b"", "the file is empty"),
    ("list.json", b"[]", "the file has no data rows"),
    ("empty.csv", b"", "the file is empty"),
    ("header.csv", b"prompt,chosen,rejected\n", "the file has no data rows"),
    ("empty.parquet", b"", "cannot read Parquet"),
])
def test_empty_file(empty_project, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    error = only_error(load_file(path))
    assert (error.file, error.row) == (name, None)
    assert str(error).startswith(f"{name}: {message}")
    with pytest.raises(DataImportError, match=name):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (0, 0, 0)


def test_parquet_with_no_rows(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert str(only_error(load_file(path))) == "none.parquet: the file has no data rows"


def test_not_parquet_at_all(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("prompt,chosen\n")
    assert str(only_error(load_file(path))).startswith("fake.parquet: cannot read Parquet")


def test_unknown_extension(empty_project, tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text('{"prompt": "x"}\n')
    loaded = load_file(path)
    assert loaded.fmt == "" and loaded.rows == []
    assert str(only_error(loaded)).startswith("pairs.txt: unknown file type '.txt'")
    with pytest.raises(DataImportError, match="pairs.txt: unknown file type"):
        import_file(empty_project.db, path)


def test_missing_file(tmp_path):
    assert str(only_error(load_file(tmp_path / "nope.jsonl"))).startswith("nope.jsonl: cannot read the file")


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "x"}', "pairs.json: expected a list of objects at the top level, got an object"),
    ('"prompt"', "pairs.json: expected a list of objects at the top level, got text"),
    ('{"prompt": "x"}\n{"prompt": "y"}\n', "pairs.json: invalid JSON at line 2, column 1: Extra data (one object per line"),
    ('[{"prompt": "x"}, ', "pairs.json: invalid JSON at line 1"),
    ('[{"prompt": "x"}, 3]', "pairs.json, row 2: expected an object, got a number (3)"),
])
def test_json_that_is_not_a_list_of_objects(empty_project, tmp_path, text, message):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    assert str(only_error(load_file(path))).startswith(message)
    with pytest.raises(DataImportError):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (0, 0, 0)


@pytest.mark.parametrize("row, field, message", [
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("b")]},
     "prompt", "missing, and chosen and rejected share no leading messages"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
     "chosen", "empty value: no messages after the prompt"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b"), assistant("c")]},
     "chosen", "empty value: no messages after the prompt"),
    ({"chosen": [user("a"), assistant("b"), user("c")], "rejected": [user("a"), assistant("b"), user("d")]},
     "chosen", "a response must start with an assistant message"),
    ({"chosen": "b", "rejected": "c"}, "prompt", "missing (without a prompt"),
])
def test_implicit_prompt_errors(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "imp.jsonl", [row])
    assert str(only_error(load_file(path))).startswith(f"imp.jsonl, row 1, field '{field}': {message}")


# --- atomicity --------------------------------------------------------------------------------

def test_failed_import_leaves_the_database_unchanged(empty_project, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)])
    good_id = import_file(empty_project.db, good)
    before = counts(empty_project.db)
    pairs_before = store.pairs(empty_project.db)

    # Bad only at the very end, after more rows than one insert batch.
    rows = [{"prompt": f"q{i}", "chosen": "c", "rejected": "r"} for i in range(1200)]
    rows[-1]["chosen"] = ""
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataImportError, match="bad.jsonl, row 1200, field 'chosen'"):
        import_file(empty_project.db, bad)

    assert counts(empty_project.db) == before == (1, 0, 3)
    assert store.pairs(empty_project.db) == pairs_before
    assert [d["id"] for d in store.datasets(empty_project.db)] == [good_id]
    # The project is still usable afterwards.
    rows[-1]["chosen"] = "fixed"
    import_file(empty_project.db, write_jsonl(tmp_path / "fixed.jsonl", rows))
    assert counts(empty_project.db) == (2, 0, 1203)


def test_store_failure_midway_stores_nothing(empty_project, tmp_path, monkeypatch):
    import_file(empty_project.db, write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a"}]))
    original = sqlite_utils.db.Table.insert_all

    def insert_some_then_fail(self, records, *args, **kwargs):
        records = list(records)
        original(self, records[:700], *args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(sqlite_utils.db.Table, "insert_all", insert_some_then_fail)
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"p{i}"} for i in range(1000)])
    with pytest.raises(RuntimeError, match="disk full"):
        import_file(empty_project.db, path)
    assert counts(empty_project.db) == (1, 1, 0)


def test_import_error_is_capped_and_summarised(empty_project, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""} for _ in range(120)])
    with pytest.raises(DataImportError) as info:
        import_file(empty_project.db, path)
    error = info.value
    assert error.total == 120 and len(error.errors) == 50
    assert [e.row for e in error.errors] == list(range(1, 51))
    message = str(error)
    assert message.startswith("bad.jsonl: 120 problems, nothing imported")
    assert "bad.jsonl, row 1, field 'prompt': empty value" in message
    assert "and 115 more" in message


def test_errors_are_studio_errors_for_the_cli(empty_project, tmp_path):
    """The CLI and the window print a StudioError's message instead of a traceback."""
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}])
    with pytest.raises(StudioError):
        import_file(empty_project.db, path)
    assert isinstance(load_file(path).errors[0], StudioError)


# --- preview ----------------------------------------------------------------------------------

def test_preview_limits_rows_but_reports_every_error(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(1, 101)]
    rows[89]["rejected"] = 3
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    shown = preview(path, limit=20)
    assert [r["prompt"] for r in shown.rows] == [f"p{i}" for i in range(1, 21)]
    assert shown.kind == "preference" and shown.fmt == "jsonl"
    assert [(e.row, e.field) for e in shown.errors] == [(90, "rejected")]
    assert len(preview(path).rows) == 20
    assert len(preview(path, limit=0).rows) == 0


# --- export -----------------------------------------------------------------------------------

EXPORT_RECORDS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "labels", "comparison_id": 7},
    {"prompt": [SYSTEM, user("Sky?")], "chosen": [assistant("Blue ☀")], "rejected": [assistant("Green")],
     "provenance": {"annotator": "ana", "run": 3}},
]


def test_export_round_trip(empty_project, tmp_path):
    path = tmp_path / "out.jsonl"
    assert export_preference_jsonl(iter(EXPORT_RECORDS), path) == 2

    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == EXPORT_RECORDS  # extra keys kept as they are
    assert list(lines[0]) == ["prompt", "chosen", "rejected", "source", "comparison_id"]
    assert "☀" in path.read_text(encoding="utf-8")  # readable, not \u-escaped
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)

    loaded = load_file(path)
    assert loaded.errors == [] and loaded.kind == "preference"
    assert loaded.rows == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in EXPORT_RECORDS]

    # And through the store: import, read back, export again, compare.
    import_file(empty_project.db, path)
    again = tmp_path / "again.jsonl"
    export_preference_jsonl(({k: p[k] for k in ("prompt", "chosen", "rejected")} for p in store.pairs(empty_project.db)),
                            again)
    assert load_file(again).rows == loaded.rows


def test_export_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("previous export\n")

    def records():
        yield EXPORT_RECORDS[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        export_preference_jsonl(records(), path)
    assert path.read_text() == "previous export\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left behind


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "c"}, "out.jsonl, row 2, field 'rejected': cannot export: missing"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "out.jsonl, row 2, field 'chosen': cannot export: empty value"),
    ({"prompt": "p", "chosen": [assistant("c")], "rejected": "r"},
     "out.jsonl, row 2, field 'chosen': cannot export: is a list of messages, but the prompt is text"),
])
def test_export_rejects_records_that_would_not_load(tmp_path, record, message):
    path = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as info:
        export_preference_jsonl([EXPORT_RECORDS[0], record], path)
    assert str(info.value) == message
    assert not path.exists() and os.listdir(tmp_path) == []


def test_export_of_nothing_writes_an_empty_file(tmp_path):
    path = tmp_path / "none.jsonl"
    assert export_preference_jsonl([], path) == 0
    assert path.read_bytes() == b""


# --- property: any unicode text survives a round trip -----------------------------------------

def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


# Text must have something besides whitespace (blank values are errors by design).
TEXT = st.text(min_size=1).filter(lambda s: s.strip() != "")
# In CSV a cell holding a JSON list is read as messages; that is the format, so leave those out.
CSV_TEXT = TEXT.filter(lambda s: not _is_json_list(s))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=4))
def test_unicode_survives_jsonl_round_trip(triples):
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "u.jsonl"
        export_preference_jsonl(records, path)
        loaded = load_file(path)
    assert loaded.errors == []
    assert loaded.rows == records


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(CSV_TEXT, CSV_TEXT, CSV_TEXT), min_size=1, max_size=4))
def test_unicode_survives_csv_round_trip(triples):
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    with tempfile.TemporaryDirectory() as folder:
        path = write_csv(Path(folder) / "u.csv", records)
        loaded = load_file(path)
    assert loaded.errors == []
    assert loaded.rows == records


# --- files that are not ordinary data files ---------------------------------------------------

@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "folder"])
def test_links_to_devices_pipes_and_folders_are_refused_without_reading(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")  # opening it for reading would block forever
    elif target == "folder":
        (tmp_path / "folder").mkdir()
    path = tmp_path / "data.jsonl"
    path.symlink_to(target if target.startswith("/") else tmp_path / target)
    error = only_error(load_file(path))
    assert str(error).startswith("data.jsonl: not a regular file")


def test_a_link_to_a_regular_file_imports_what_it_points_at(tmp_path):
    (tmp_path / "real.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real.jsonl")
    assert load_file(tmp_path / "link.jsonl").rows == [{"prompt": "hi"}]


def test_an_oversized_json_document_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_JSON_FILE_BYTES", 10)
    path = tmp_path / "big.json"
    path.write_text('[{"prompt": "hello"}]')
    assert "save it as JSON Lines" in only_error(load_file(path)).message


def test_deeply_nested_jsonl_line_is_an_error_on_its_row(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "\n")
    error = only_error(load_file(path))
    assert (error.row, error.message) == (2, datasets.TOO_DEEP)


def test_deeply_nested_json_document_is_an_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    assert only_error(load_file(path)).message == datasets.TOO_DEEP


def test_deeply_nested_csv_cell_is_an_error_naming_row_and_field(tmp_path):
    path = tmp_path / "deep.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq," + "[" * 100_000 + ",b\n")
    error = only_error(load_file(path))
    assert (error.row, error.field, error.message) == (2, "chosen", datasets.TOO_DEEP)


def test_a_cut_jsonl_line_reports_the_column_where_it_ends(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "x", "chosen"\n')
    error = only_error(load_file(path))
    assert error.message == "invalid JSON: Expecting ':' delimiter (column 25, the end of the line: is it cut short?)"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf16_file_is_named_as_utf16(tmp_path, encoding, suffix):
    path = tmp_path / f"wide{suffix}"
    text = {".jsonl": '{"prompt": "hi"}\n', ".json": '[{"prompt": "hi"}]', ".csv": "prompt\nhi\n"}[suffix]
    path.write_bytes(text.encode(encoding))
    assert only_error(load_file(path)).message.startswith("the file is UTF-16 encoded")

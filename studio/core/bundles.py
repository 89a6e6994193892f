"""Run bundles: a run as a self-contained folder for another machine, and its results brought back.

A bundle holds everything a run needs and nothing of the project database::

    manifest.json        format, bundle id, versions, the run it came from, sha256 of every input file
    config.json          the run's settings (reward-model paths rewritten into the bundle)
    data.json            the TrainingData: pairs or prompts, and the eval prompts
    model/               the base model folder (unless made with include_model=False)
    start/adapter-<i>/   the adapters merged into the base before training (a run from a checkpoint)
    rewards/<i>/         the reward models the run's reward sources load
    README.md            the commands that run it and bring it back
    run/                 written by `studio run-bundle` (rank 0 only):
      status.json        status, step, error, processes, updated (replaced atomically)
      metrics.jsonl      one line per step, TRL metric names (complete lines only are ever read)
      checkpoints.jsonl  one line per checkpoint: step, folder, eval samples
      checkpoint-<n>/    adapter/ + trainer_state.pt, the local runs' layout

`import_run` turns a bundle (finished or still running) into a run of a project; importing again
updates that same run, so `follow` can simply import every few seconds. It also reads the output
folders of TRL, OpenRLHF and verl (engine_outputs: their logs and LoRA checkpoints).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from . import distributed, runs, store, trackers
from .errors import StudioError
from .models import ModelSource, resolve_folder
from .settings import check_settings

FORMAT = 1
IMPORTED_KEY = "imported_runs"  # project setting: {source key: run id}, what makes import idempotent


class BundleError(StudioError):
    """A bundle that cannot be made, run or imported, with a message naming the file."""


# --- small file helpers -------------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def new_folder(out: Path, what: str):
    """Yield a folder built beside `out` (which must not hold anything yet), renamed to `out` when the
    block ends, removed if it fails: an interrupted `what` never looks like a finished one."""
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} already exists and is not empty; choose a new folder for the {what}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if out.exists():
            out.rmdir()  # empty: checked above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file another process may be appending to (a cut last line is left)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the part after the last newline is still being written
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BundleError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
    return records


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append whole lines in one write, flushed to disk, so a reader never sees part of a record."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path, folders: list[str]) -> dict[str, str]:
    """{relative path: sha256} of every file under `folders` of `root` (files or folders)."""
    found = {}
    for name in folders:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found.update({p.relative_to(root).as_posix(): sha256(p) for p in files})
    return found


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("alignment-studio", "torch", "transformers", "peft", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


# --- making a bundle ------------------------------------------------------------------------------

def copy_reward_models(sources: list[dict], reward_root: Path, out: Path) -> list[dict]:
    """The sources, their reward models copied into the bundle where they resolve from it.

    A trained reward model keeps its place (reward_models/<name>/ under the root); a reward-model
    folder goes to rewards/<i>/ and its path points there. (A trained reward model's meta.json names
    its base model as the project does: the other machine needs that base model too.)
    """
    from .rewards import RewardModelFolder, TrainedRewardModel, source_from_json

    bundled = []
    for index, data in enumerate(sources):
        source = source_from_json(data)
        if isinstance(source, TrainedRewardModel):
            target = source.folder(out)
            shutil.copytree(source.folder(reward_root), target)
            bundled.append(data)
        elif isinstance(source, RewardModelFolder):
            target = Path("rewards") / str(index)
            shutil.copytree(source.folder(reward_root), out / target)
            bundled.append({**data, "path": target.as_posix()})
        else:  # a rule: nothing to copy
            bundled.append(data)
    return bundled


def make_bundle(project_path: Path | str, run_id: int, out: Path | str, include_model: bool = True) -> Path:
    """Write run `run_id` of a project as a bundle folder `out` (which must not hold anything yet)."""
    out, project_path = Path(out), Path(project_path)
    with store.Project.open(project_path, read_only=True) as project:
        run = store.get_run(project.db, run_id)
        config = runs.engine_module(run["method"]).Config.from_json(run["config"])
        data = runs.gather_training_data(project.db, config)
        start = runs.model_start(project.db, config.parent_checkpoint_id)
        project_name = store.get_setting(project.db, "name")
    with new_folder(out, "bundle") as partial:
        config_json = config.to_json()
        if "reward_sources" in config_json:
            config_json["reward_sources"] = copy_reward_models(config_json["reward_sources"], data.reward_root, partial)
        config_json["parent_checkpoint_id"] = None  # the start state travels as adapters, not as an id
        if include_model:
            shutil.copytree(resolve_folder(start.base), partial / "model")
            base = ModelSource("folder", "model").to_json()
        else:  # the other machine must have it where the project has it (or the demo's download)
            base = start.base.to_json()
        for index, adapter in enumerate(start.adapters):
            shutil.copytree(adapter, partial / "start" / f"adapter-{index}")
        write_atomic(partial / "config.json", json.dumps(config_json, indent=2))
        write_atomic(partial / "data.json", json.dumps(
            {"pairs": data.pairs, "prompts": data.prompts, "eval_prompts": data.eval_prompts}, ensure_ascii=False))
        manifest = {
            "format": FORMAT, "bundle_id": uuid.uuid4().hex, "created_at": time.time(), "versions": versions(),
            "source": {"project": str(project_path.resolve()), "project_name": project_name, "run_id": run_id,
                       "run_name": run["name"], "parent_checkpoint_id": run["parent_checkpoint_id"]},
            "method": config.method, "base_model": base, "start_adapters": len(start.adapters),
            "counts": {"pairs": len(data.pairs), "prompts": len(data.prompts), "eval_prompts": len(data.eval_prompts)},
            "files": hash_files(partial, [p.name for p in sorted(partial.iterdir())]),
        }
        write_atomic(partial / "manifest.json", json.dumps(manifest, indent=2))
        (partial / "README.md").write_text(bundle_readme(out, manifest), encoding="utf-8")
    return out


def bundle_readme(out: Path, manifest: dict) -> str:
    source = manifest["source"]
    return f"""# Run bundle: {source['run_name']} ({manifest['method'].upper()})

From run {source['run_id']} of the studio project "{source['project_name']}". Everything the run needs is
in this folder: its settings (config.json), its data (data.json), the base model (model/, unless it
was left out: see manifest.json's base_model), the adapters it starts from (start/) and its reward
models (rewards/). manifest.json lists every file's sha256; `run-bundle` checks them first.

Run it (writes run/ inside this folder; run it again to resume from the last checkpoint):

    studio run-bundle {out.name}/                                         # one process
    torchrun --nproc_per_node 4 -m studio run-bundle {out.name}/          # data-parallel, one node
    accelerate launch --num_processes 4 -m studio run-bundle {out.name}/  # the same through accelerate

The global batch is the config's, whatever the number of processes. Bring the results back into
the project (safe while the run is still writing; --follow keeps charts live):

    studio import-run PROJECT_DIR {out.name}/ [--follow]
"""


# --- running a bundle -----------------------------------------------------------------------------

def load_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.exists():
        raise BundleError(f"{bundle} is not a run bundle (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}; this studio reads format {FORMAT}")
    return manifest


def verify_bundle(bundle: Path) -> dict:
    """The manifest, after checking every input file's hash (a copy cut short or edited is refused)."""
    manifest = load_manifest(bundle)
    for name, expected in manifest["files"].items():
        path = bundle / name
        if not path.exists():
            raise BundleError(f"{path}: listed in manifest.json but missing (an incomplete copy?)")
        if sha256(path) != expected:
            raise BundleError(f"{path}: its sha256 differs from manifest.json's (changed or cut short)")
    return manifest


class BundleSink(runs.BufferedSink):
    """A run's records as files inside its bundle (see the module docstring for the layout).

    With `writes=False` (ranks other than 0) it only reads: where to resume from.
    """

    def __init__(self, bundle: Path, writes: bool = True, batch_size: int = 10, max_delay_s: float = 2.0) -> None:
        super().__init__(batch_size, max_delay_s)
        self.run_dir = Path(bundle) / "run"
        self.writes = writes
        self.step = 0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def checkpoints_path(self) -> Path:
        return self.run_dir / "checkpoints.jsonl"

    def add(self, record: dict) -> None:
        self.step = record["step"]
        super().add(record)

    def write(self, records: list[dict]) -> None:
        if self.writes:
            append_jsonl(self.metrics_path, records)

    def set_status(self, status: str, error: str | None = None) -> None:
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "status.json", json.dumps(
                {"status": status, "error": error, "step": self.step, "processes": distributed.world_size(),
                 "updated_at": time.time()}))

    def checkpoint_saved(self, step: int, folder: Path, samples: list[dict], base_samples: list[dict] = ()) -> None:
        if self.writes:
            append_jsonl(self.checkpoints_path, [{"step": step, "folder": folder.name, "samples": samples}])

    def last_checkpoint(self, log) -> Path | None:
        return runs.last_good([(entry["step"], self.run_dir / entry["folder"])
                               for entry in read_jsonl(self.checkpoints_path)], log)

    def discard_after(self, step: int) -> None:
        self.step = step
        if not self.writes:
            return
        for path in (self.metrics_path, self.checkpoints_path):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r["step"] <= step]
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def bundle_training_data(bundle: Path) -> runs.TrainingData:
    data = json.loads((bundle / "data.json").read_text(encoding="utf-8"))
    return runs.TrainingData(pairs=data["pairs"], prompts=data["prompts"], eval_prompts=data["eval_prompts"],
                             reward_root=bundle)


def bundle_start(bundle: Path, manifest: dict) -> runs.ModelStart:
    base = ModelSource.from_json(manifest["base_model"])
    if base.kind == "folder" and not Path(base.path).is_absolute():
        base = ModelSource("folder", str(bundle / base.path), base.allow_pickle)
    return runs.ModelStart(base, [bundle / "start" / f"adapter-{i}" for i in range(manifest["start_adapters"])])


def run_bundle(bundle: Path | str, control: runs.RunControl | None = None,
               on_metrics: Callable[[dict], None] | None = None, on_log: Callable[[str], None] | None = None) -> str:
    """Train the bundle's run (resuming from its last checkpoint); returns the final status.

    Under torchrun / accelerate launch, every process calls this: they join one process group and
    train data-parallel; rank 0 alone writes run/.
    """
    bundle = Path(bundle).resolve()
    manifest = verify_bundle(bundle)
    distributed.init_from_environment()
    try:
        values = json.loads((bundle / "config.json").read_text())
        check_settings(manifest["method"], values)  # a config.json edited by hand is checked as the form is
        config = runs.engine_module(manifest["method"]).Config.from_json(values)
        data = bundle_training_data(bundle)
        sink = BundleSink(bundle, writes=distributed.is_main())
        if distributed.is_main() and config.report_to:  # the trackers the run asks for, on the node that writes
            info = trackers.RunInfo(project=bundle.name, run_id=0, run_name=manifest["source"]["run_name"],
                                    run_dir=bundle / "run", config=values)
            sink = trackers.reporting(sink, trackers.parse_report_to(config.report_to), info, data.eval_prompts,
                                      on_log or (lambda message: None))
        return runs.train(config, data, bundle_start(bundle, manifest), bundle / "run", sink, control,
                          on_metrics, on_log)
    finally:
        distributed.shutdown()


# --- bringing results back ------------------------------------------------------------------------

def imported_run(db, key: str, method: str, config: dict, name: str, parent_checkpoint_id: int | None) -> int:
    """The run that holds source `key`'s results in this project: found, or created once."""
    imported = store.get_setting(db, IMPORTED_KEY, {})
    if key in imported:
        return imported[key]
    with db.atomic():
        run_id = store.create_run(db, method, config, name=name, parent_checkpoint_id=parent_checkpoint_id)
        store.set_setting(db, IMPORTED_KEY, {**imported, key: run_id})
    return run_id


def replace_metrics(db, run_id: int, records: list[dict]) -> None:
    """The run's metrics become exactly `records` (last record of a step wins), in one transaction."""
    by_step = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update(record)
    rows = [{"time": time.time(), **{k: v for k, v in r.items() if isinstance(v, (int, float)) and v is not None}}
            for r in by_step.values()]
    with db.atomic():
        db.execute("DELETE FROM metrics WHERE run_id = ?", [run_id])
        store.write_metrics(db, run_id, rows)


def add_checkpoint_folder(project_path: Path, run_id: int, name: str, fill: Callable[[Path], None]) -> Path:
    """The run's checkpoint folder `name` in the project, filled by `fill(folder)` whole or not at all."""
    target = project_path / "runs" / str(run_id) / name
    if not target.exists():
        partial = target.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        fill(partial)
        os.replace(partial, target)
    return target


def _sample_rows(db, samples: list[dict], eval_prompts: dict) -> list[dict]:
    """Samples whose prompt is one of this project's prompts (matched by its text), with its id here."""
    by_text = {json.dumps(row["prompt"], sort_keys=True): row["id"] for row in store.prompts(db)}
    rows = []
    for sample in samples:
        prompt = eval_prompts.get(sample["prompt_id"])
        project_prompt_id = by_text.get(json.dumps(prompt, sort_keys=True))
        if project_prompt_id is not None:
            rows.append({**sample, "prompt_id": project_prompt_id})
    return rows


def import_bundle(db, project_path: Path, bundle: Path) -> int:
    """Bring a bundle's run (finished or still running) into the project; returns its run id there."""
    manifest = load_manifest(bundle)
    source = manifest["source"]
    same_project = Path(source["project"]) == project_path.resolve()
    parent = source["parent_checkpoint_id"] if same_project else None
    config = {**json.loads((bundle / "config.json").read_text()), "parent_checkpoint_id": parent}
    run_id = imported_run(db, f"bundle:{manifest['bundle_id']}", manifest["method"], config,
                           f"{source['run_name']} (bundle)", parent)
    sink = BundleSink(bundle, writes=False)
    # The status first: the writer flushes metrics and checkpoints before it writes a final status,
    # so a final status read here comes with all of them below.
    status_path = sink.run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else None
    replace_metrics(db, run_id, read_jsonl(sink.metrics_path))
    eval_prompts = {row["id"]: row["prompt"]
                    for row in json.loads((bundle / "data.json").read_text(encoding="utf-8"))["eval_prompts"]}
    known = {c["step"] for c in store.checkpoints(db, run_id)}
    for entry in read_jsonl(sink.checkpoints_path):
        if entry["step"] in known:
            continue
        source_folder = sink.run_dir / entry["folder"]
        folder = add_checkpoint_folder(project_path, run_id, entry["folder"],
                                        lambda partial: shutil.copytree(source_folder, partial))
        runs.SQLiteSink(db, run_id).checkpoint_saved(entry["step"], folder,
                                                     _sample_rows(db, entry["samples"], eval_prompts))
    if status is not None:
        store.set_run_status(db, run_id, status["status"], error=status["error"])
    return run_id


def import_run(db, project_path: Path | str, source: Path | str) -> int:
    """Import a bundle, or a TRL, OpenRLHF or verl output folder (engine_outputs), into the project
    whose database is `db`; importing again updates the same run. Returns the run's id."""
    from .engine_outputs import import_engine_output

    source, project_path = Path(source), Path(project_path)
    if (source / "manifest.json").exists():
        return import_bundle(db, project_path, source)
    return import_engine_output(db, project_path, source)


def follow(db, project_path: Path | str, source: Path | str, interval_s: float = 2.0,
           should_stop: Callable[[], bool] = lambda: False, on_import: Callable[[int, str], None] | None = None) -> int:
    """Import `source` every `interval_s` seconds until its run ends (or `should_stop()`); returns the run id."""
    while True:
        run_id = import_run(db, project_path, source)
        status = store.get_run(db, run_id)["status"]
        if on_import is not None:
            on_import(run_id, status)
        if status in ("completed", "stopped", "failed") or should_stop():
            return run_id
        time.sleep(interval_s)

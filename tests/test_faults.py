"""Fault injection: what a project promises when files are planted, damaged, moved, full or killed.

docs/reliability.md lists each promise and the test here that proves it.
"""

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from studio.cli import main
from studio.core import runs, store
from studio.core.tiny import build_tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(db, run_id):
    return store.run_metrics(db, run_id)["loss"]


def reopen(project) -> store.Project:
    """Close the fixture's project and open the folder again (as a new process would)."""
    project.close()
    return store.Project.open(project.path)


# --- planted files ----------------------------------------------------------------------------

def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=...\n")
    folder = tmp_path / "received"
    store.Project.create(folder).close()
    (folder / store.LOCK_NAME).unlink()
    (folder / store.LOCK_NAME).symlink_to(victim)
    with pytest.raises(store.ProjectError, match="symbolic link"):
        store.Project.open(folder)
    assert victim.read_text() == "export PATH=...\n"


def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path):
    folder = tmp_path / "received"
    store.Project.create(folder).close()
    (folder / store.LOCK_NAME).unlink()
    os.mkfifo(folder / store.LOCK_NAME)  # opening it must not block either
    with pytest.raises(store.ProjectError, match="not a regular file"):
        store.Project.open(folder)


# --- a damaged database -----------------------------------------------------------------------

def project_with_labels(tmp_path) -> Path:
    folder = tmp_path / "p"
    with store.Project.create(folder) as project:
        store.add_dataset(project.db, "prompts", "prompts", [{"prompt": f"question {i} " * 20} for i in range(400)])
    return folder


def test_a_zero_byte_database_is_refused_not_made_a_new_project(tmp_path, capsys):
    folder = project_with_labels(tmp_path)
    (folder / store.DB_NAME).write_bytes(b"")
    with pytest.raises(store.DamagedProjectError, match="is empty"):
        store.Project.open(folder)
    assert main(["runs", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"studio: error: {folder / store.DB_NAME} is empty (0 bytes)") and "Traceback" not in err
    assert (folder / store.DB_NAME).stat().st_size == 0  # nothing was written into it


def test_a_file_that_is_not_a_database_is_refused(tmp_path, capsys):
    folder = project_with_labels(tmp_path)
    (folder / store.DB_NAME).write_text("hello, I am a text file\n" * 100)
    assert main(["import", str(folder), str(tmp_path / "x.jsonl")]) == 2
    assert "is not an SQLite database" in capsys.readouterr().err


def overwrite_middle_page(file: Path) -> None:
    data = bytearray(file.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    middle = (len(data) // page // 2) * page
    data[middle:middle + page] = bytes(range(256)) * (page // 256)
    file.write_bytes(bytes(data))


def test_pages_overwritten_in_the_middle_are_detected_and_nothing_more_is_written(tmp_path, capsys):
    folder = project_with_labels(tmp_path)
    assert main(["backup", str(folder)]) == 0
    overwrite_middle_page(folder / store.DB_NAME)
    damaged = digest(folder / store.DB_NAME)
    with pytest.raises(store.DamagedProjectError, match="is damaged") as caught:
        store.Project.open(folder)
    assert "put the newest backup in its place: rm -f " in str(caught.value)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert main(["import", str(folder), str(pairs)]) == 2
    assert main(["check", str(folder)]) == 1
    assert "problem: " in capsys.readouterr().out
    assert digest(folder / store.DB_NAME) == damaged

    backup = sorted((folder / store.BACKUP_DIR).glob("*.db"))[-1]  # the advice, followed
    for journal in ("-wal", "-shm"):
        (folder / f"{store.DB_NAME}{journal}").unlink(missing_ok=True)
    shutil.copy(backup, folder / store.DB_NAME)
    with store.Project.open(folder) as project:
        assert len(store.prompts(project.db)) == 400
    assert main(["check", str(folder)]) == 0


def test_a_database_from_a_newer_version_is_refused_untouched(tmp_path):
    folder = project_with_labels(tmp_path)
    db = sqlite3.connect(folder / store.DB_NAME)
    db.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('studio', 'm999_future', 'x')")
    db.commit()
    db.close()
    before = digest(folder / store.DB_NAME)
    for read_only in (False, True):
        with pytest.raises(store.DamagedProjectError, match="made by a newer Alignment Studio .*m999_future"):
            store.Project.open(folder, read_only=read_only)
    assert digest(folder / store.DB_NAME) == before


def test_backups_are_consistent_copies_of_an_open_project_and_rotate(tmp_path, capsys):
    folder = project_with_labels(tmp_path)
    with store.Project.open(folder) as project:  # open for writing while it is backed up
        assert main(["backup", str(folder), "--to", str(tmp_path / "copy.db")]) == 0
        for _ in range(store.BACKUPS_KEPT + 2):
            store.rotating_backup(project.db, project.path, "test")
            time.sleep(1.01)  # backup names carry the second they were made
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("SELECT COUNT(*) FROM prompts").fetchone() == (400,)
    copy.close()
    assert len(list((folder / store.BACKUP_DIR).glob("*.db"))) == store.BACKUPS_KEPT


def test_the_daily_backup_is_made_once_a_day(tmp_path):
    folder = project_with_labels(tmp_path)
    with store.Project.open(folder) as project:
        assert store.daily_backup(project) is not None
        assert store.daily_backup(project) is None  # the one just made is less than a day old
        made = next((folder / store.BACKUP_DIR).glob("*.db"))
        os.utime(made, (time.time() - 25 * 3600,) * 2)
        assert store.daily_backup(project) is not None


# --- moved and copied projects ----------------------------------------------------------------

def test_a_moved_project_resumes_and_exports(project, make_toy_run, tmp_path):
    run_id = make_toy_run()
    control = runs.RunControl()
    runs.execute(project.path, run_id, control, on_metrics=lambda r: control.stop() if r["step"] == 4 else None)
    assert all(not Path(c["path"]).is_absolute() for c in store.checkpoints(project.db, run_id))
    project.close()
    moved = tmp_path / "moved"
    shutil.move(project.path, moved)
    assert runs.execute(moved, run_id) == "completed"
    with store.Project.open(moved) as again:
        last = store.checkpoints(again.db, run_id)[-1]
        assert runs.export_adapter(again.db, last["id"], tmp_path / "adapter").joinpath("adapter_config.json").exists()


def test_a_copied_project_reads_its_own_checkpoints(project, make_toy_run, tmp_path):
    run_id = make_toy_run()
    runs.execute(project.path, run_id)
    project.close()
    copy = tmp_path / "copy"
    shutil.copytree(project.path, copy)
    shutil.rmtree(project.path / "runs")  # the original loses its checkpoints: the copy must not care
    with store.Project.open(copy) as copied:
        last = store.checkpoints(copied.db, run_id)[-1]
        model, _ = runs.load_model_state(copied.db, last["id"])
        assert model is not None


def test_absolute_checkpoint_paths_of_old_projects_are_made_relative(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    db = store.connect(folder)
    store.migrations.apply(db, stop_before="m003_portable_checkpoints")
    run_id = db["runs"].insert({"method": "dpo", "config": "{}", "status": "completed"}).last_pk
    db["checkpoints"].insert({"run_id": run_id, "step": 3, "path": f"/somewhere/else/runs/{run_id}/checkpoint-3"})
    db.close()
    with store.Project.open(folder) as project:
        checkpoint = store.checkpoints(project.db, run_id)[0]
        assert checkpoint["path"] == f"runs/{run_id}/checkpoint-3"
        assert store.checkpoint_folder(project.db, checkpoint) == project.path / f"runs/{run_id}/checkpoint-3"


# --- a different base -------------------------------------------------------------------------

def test_a_changed_base_is_refused_for_resume_export_and_new_runs_from_a_checkpoint(project, make_toy_run, tmp_path):
    run_id = make_toy_run()
    control = runs.RunControl()
    runs.execute(project.path, run_id, control, on_metrics=lambda r: control.stop() if r["step"] == 4 else None)
    checkpoint = store.checkpoints(project.db, run_id)[-1]
    run_base = json.loads(store.get_run(project.db, run_id)["base_identity"])
    assert run_base["hash"] == json.loads(checkpoint["base_identity"])["hash"]

    other = build_tiny_model_folder(tmp_path / "retrained", seed=1)  # same architecture, other weights
    store.set_setting(project.db, "base_model", {"kind": "folder", "path": str(other)})
    with pytest.raises(runs.BaseModelChangedError, match="was started on"):
        runs.execute(project.path, run_id)
    with pytest.raises(runs.BaseModelChangedError, match=f"Checkpoint {checkpoint['id']} .* was trained on"):
        runs.export_merged(project.db, checkpoint["id"], tmp_path / "merged")
    with pytest.raises(runs.BaseModelChangedError):
        runs.create_run(project.db, runs.make_config("toy", {"parent_checkpoint_id": checkpoint["id"]}))
    assert not (tmp_path / "merged").exists()
    assert store.get_run(project.db, run_id)["status"] == "failed"  # said why, kept its checkpoints
    assert "was started on" in store.get_run(project.db, run_id)["error"]


# --- runs: resume, locks, final status, damaged checkpoints -----------------------------------

def test_resume_of_a_run_that_died_before_its_first_checkpoint_does_not_duplicate_metrics(project, make_toy_run):
    straight = make_toy_run(max_steps=4, checkpoint_every=10)
    runs.execute(project.path, straight)
    died = make_toy_run(max_steps=4, checkpoint_every=10)
    # As after a kill -9 at step 2: two steps' metrics flushed, no checkpoint yet.
    store.write_metrics(project.db, died, [{"step": s, "time": 0.0, "loss": 9.0} for s in (1, 2)])
    assert runs.execute(project.path, died) == "completed"
    assert losses(project.db, died) == losses(project.db, straight)


def test_a_run_held_by_another_process_is_not_trained_twice(project, make_toy_run):
    run_id = make_toy_run(max_steps=200, checkpoint_every=1)
    child = f"""
import time
from studio.core import runs
runs.ENGINE_MODULES["toy"] = "tests.toy_engine"
import tests.toy_engine as toy
step = toy.Engine.train_step
toy.Engine.train_step = lambda self, n: (time.sleep(0.2), step(self, n))[1]
runs.execute({str(project.path)!r}, {run_id})
"""
    process = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not store.checkpoints(project.db, run_id):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the child wrote no checkpoint within 120 s"
            time.sleep(0.05)
        with pytest.raises(store.ProjectLockedError, match=f"The run in .*runs/{run_id} is being trained by another process .pid {process.pid}."):
            runs.execute(project.path, run_id)
        project = reopen(project)  # the window reopening: the child's run is not "interrupted"
        assert store.get_run(project.db, run_id)["status"] == "running"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    project = reopen(project)
    assert store.get_run(project.db, run_id)["status"] == "interrupted"
    steps = store.run_metrics(project.db, run_id)["loss"][0]
    assert steps == sorted(set(steps))  # one writer: no step twice
    project.close()


def test_a_failed_metrics_write_still_records_the_final_status(project, make_toy_run, monkeypatch):
    run_id = make_toy_run()

    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "write_metrics", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        runs.execute(project.path, run_id)
    run = store.get_run(project.db, run_id)
    assert run["status"] == "failed"
    assert "database or disk is full" in run["error"] and "could not be written" in run["error"]


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_one_and_says_so(project, make_toy_run, monkeypatch, capsys):
    import torch

    straight = make_toy_run()
    runs.execute(project.path, straight)
    run_id = make_toy_run()
    save = torch.save

    def full_at_step_6(obj, path, *args, **kwargs):
        if obj.get("step") == 6:
            Path(path).write_bytes(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; basic_ios::clear: iostream error")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_6)
    project_dir = str(project.path)
    project.close()
    assert main(["train", project_dir, "--resume", str(run_id)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("studio: error: The disk is full") and "Traceback" not in err
    monkeypatch.setattr(torch, "save", save)
    with store.Project.open(project_dir) as again:
        assert [c["step"] for c in store.checkpoints(again.db, run_id)] == [3]
        assert store.get_run(again.db, run_id)["status"] == "failed"
    assert runs.execute(project_dir, run_id) == "completed"
    with store.Project.open(project_dir) as again:
        assert losses(again.db, run_id) == losses(again.db, straight)


@pytest.mark.parametrize("damage", ["truncate adapter", "truncate trainer state", "delete folder"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(project, make_toy_run, damage):
    straight = make_toy_run()
    runs.execute(project.path, straight)
    run_id = make_toy_run()
    control = runs.RunControl()
    runs.execute(project.path, run_id, control, on_metrics=lambda r: control.stop() if r["step"] == 4 else None)
    last = store.checkpoint_folder(project.db, store.checkpoints(project.db, run_id)[-1])
    if damage == "delete folder":
        shutil.rmtree(last)
    else:
        file = last / (runs.ADAPTER_FILE if damage == "truncate adapter" else runs.TRAINER_STATE_FILE)
        file.write_bytes(file.read_bytes()[:-100])
    messages = []
    assert runs.execute(project.path, run_id, on_log=messages.append) == "completed"
    assert any(m.startswith("Checkpoint at step 4 is damaged") for m in messages), messages
    assert "Resumed from the checkpoint at step 3" in messages
    assert losses(project.db, run_id) == losses(project.db, straight)
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [3, 6]


def test_export_of_a_deleted_or_truncated_checkpoint_is_a_clear_error(project, make_toy_run, tmp_path, capsys):
    run_id = make_toy_run()
    runs.execute(project.path, run_id)
    first, last = store.checkpoints(project.db, run_id)
    shutil.rmtree(store.checkpoint_folder(project.db, first))
    adapter = store.checkpoint_folder(project.db, last) / runs.ADAPTER_FILE
    adapter.write_bytes(adapter.read_bytes()[:50])
    project_dir = str(project.path)
    project.close()
    assert main(["export", project_dir, str(tmp_path / "m1"), "--merged", str(first["id"])]) == 2
    assert f"studio: error: Checkpoint {first['id']} (run {run_id}, step 3) cannot be used: its folder" in capsys.readouterr().err
    assert main(["export", project_dir, str(tmp_path / "m2"), "--adapter", str(last["id"])]) == 2
    assert "adapter_model.safetensors is" in capsys.readouterr().err
    assert main(["check", project_dir]) == 1
    out = capsys.readouterr().out
    assert f"checkpoint {first['id']} (run {run_id}, step 3): its folder" in out and "2 problems" in out


KILL_POINTS = {
    # where the child process dies while writing its second checkpoint (step 6): (function, when)
    "trainer state half written": ("torch.save", "args[0]['step'] == 6"),
    "files written, before the rename": ("os.replace", "str(args[0]).endswith('checkpoint-6.partial')"),
    "renamed, before registration": ("store.add_checkpoint", "args[2] == 6"),
    "registered, eval samples uncommitted": ("store.add_samples", "args[1][0]['checkpoint_id'] > first"),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_each_checkpoint_write_point_resumes_identically(project, make_toy_run, point):
    straight = make_toy_run(max_steps=9)
    runs.execute(project.path, straight)
    run_id = make_toy_run(max_steps=9)
    target, when = KILL_POINTS[point]
    child = f"""
import os, signal, torch
from pathlib import Path
from studio.core import runs, store
torch.set_num_threads(1)
runs.ENGINE_MODULES["toy"] = "tests.toy_engine"
owner, name = ({target!r}).split(".")
module = {{"torch": torch, "os": os, "store": store}}[owner]
original = getattr(module, name)
first = 10**9
def die_on_second(*args, **kwargs):
    global first
    if name == "add_samples" and first == 10**9:
        first = args[1][0]["checkpoint_id"]
    elif {when}:
        if name == "save":
            Path(args[1]).write_bytes(b"PK\\x03\\x04 half")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(module, name, die_on_second)
runs.execute({str(project.path)!r}, {run_id})
"""
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert store.get_run(project.db, run_id)["status"] == "running"  # it never got to say otherwise
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [3]
    assert runs.execute(project.path, run_id) == "completed"
    assert losses(project.db, run_id) == losses(project.db, straight)
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [3, 6, 9]


def test_a_chat_template_refused_by_the_sandbox_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "chat_template.jinja").write_text("{{ messages.append(1) }}")
    folder = tmp_path / "p"
    assert main(["init", str(folder), "--model", str(model)]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", '
                     '"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}\n')
    assert main(["import", str(folder), str(pairs)]) == 0
    assert main(["train", str(folder), "--method", "dpo", "--set", "max_steps=1"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"studio: error: The chat template of the model {model} tried something the "
                           "template sandbox forbids (access to attribute 'append'")


def save_reward_model(folder, tiny_model_dir, seed):
    import torch
    from transformers import AutoModelForSequenceClassification

    from studio.core.models import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(tiny_model_dir).save_pretrained(folder)


def test_a_reward_model_retrained_under_the_same_name_is_refused_on_resume(project, tiny_model_dir):
    save_reward_model(project.path / "rm", tiny_model_dir, seed=0)
    store.add_dataset(project.db, "train", "prompts", [{"prompt": "Say something."}] * 4)
    config = runs.make_config("ppo", {"reward_sources": [{"type": "reward_model", "path": "rm"}]})
    run_id = runs.create_run(project.db, config)
    recorded = json.loads(store.get_run(project.db, run_id)["base_identity"])["reward_models"]
    assert list(recorded) == ["reward_model rm"]

    save_reward_model(project.path / "rm", tiny_model_dir, seed=1)  # retrained: same name, other weights
    with pytest.raises(runs.BaseModelChangedError, match="reward model reward_model rm .* has changed since"):
        runs.execute(project.path, run_id)
    assert "has changed since" in store.get_run(project.db, run_id)["error"]


@pytest.fixture(scope="module")
def whole_checkpoint(tmp_path_factory):
    """A checkpoint folder laid out as save_checkpoint writes it (small tensors, no model)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoint") / "checkpoint-3"
    (folder / "adapter").mkdir(parents=True)
    save_file({"a.lora_A.weight": torch.randn(8, 4), "a.lora_B.weight": torch.randn(4, 8)},
              folder / runs.ADAPTER_FILE)
    torch.save({"step": 3, "optimizer": {"state": torch.randn(64)}}, folder / runs.TRAINER_STATE_FILE)
    assert runs.verify_checkpoint(folder) is None
    return folder


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from([runs.ADAPTER_FILE, runs.TRAINER_STATE_FILE]), keep=st.floats(0.0, 0.999))
def test_any_truncation_of_a_checkpoint_file_is_detected(whole_checkpoint, tmp_path_factory, which, keep):
    folder = Path(shutil.copytree(whole_checkpoint, tmp_path_factory.mktemp("cut") / "checkpoint-3"))
    data = (folder / which).read_bytes()
    (folder / which).write_bytes(data[:int(len(data) * keep)])
    problem = runs.verify_checkpoint(folder)
    assert problem is not None and which.rsplit("/", 1)[-1] in problem

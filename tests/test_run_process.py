"""Runs in a child process: messages, pause/resume/stop across processes, a killed child, a dead parent."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from studio.core import runs, store
from studio.core.run_process import RunProcess

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_trains_in_another_process_and_reports_every_step(project, make_toy_run):
    run_id = make_toy_run()
    process = RunProcess(project.path, run_id)
    messages = list(process.messages())
    assert process.pid not in (None, os.getpid())
    assert [m[1]["step"] for m in messages if m[0] == "metrics"] == [1, 2, 3, 4, 5, 6]
    assert any(m[0] == "log" and "Checkpoint saved at step 6" in m[1] for m in messages)
    assert messages[-1] == ("finished", "completed")
    assert store.get_run(project.db, run_id)["status"] == "completed"
    assert max(store.run_metrics(project.db, run_id)["loss"][0]) == 6


def test_pause_resume_and_stop_reach_the_child(project, make_toy_run):
    run_id = make_toy_run(max_steps=1000, checkpoint_every=500)
    process = RunProcess(project.path, run_id)
    kinds = []
    for message in process.messages():
        kinds.append(message[0])
        if message[0] == "metrics" and message[1]["step"] == 2:
            process.control.pause()
        elif message[0] == "paused":
            assert store.get_run(project.db, run_id)["status"] == "paused"
            process.control.resume()
        elif message[0] == "metrics" and message[1]["step"] == 4:
            process.control.stop()
    assert kinds.index("paused") < kinds.index("resumed") and kinds[-1] == "finished"
    assert store.get_run(project.db, run_id)["status"] == "stopped"
    last = store.checkpoints(project.db, run_id)[-1]["step"]
    assert 4 <= last < 1000  # the stop saved a checkpoint at the step boundary


def test_a_killed_child_becomes_a_failed_run_with_its_checkpoint_intact(project, make_toy_run):
    run_id = make_toy_run(max_steps=1000, checkpoint_every=3)
    process = RunProcess(project.path, run_id)
    messages = []
    for message in process.messages():
        messages.append(message)
        if message[0] == "metrics" and message[1]["step"] == 4:
            os.kill(process.pid, signal.SIGKILL)
    kind, text = messages[-1]
    assert kind == "failed" and "ended unexpectedly" in text and "resume" in text
    run = store.get_run(project.db, run_id)
    assert run["status"] == "failed" and "exit code -9" in run["error"]
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [3]


@pytest.mark.parametrize("phase", ["model load", "training"])
def test_stop_now_ends_the_child_in_any_phase_and_the_run_resumes_from_its_last_checkpoint(
        project, make_toy_run, phase):
    run_id = make_toy_run(max_steps=1000, checkpoint_every=3)
    process = RunProcess(project.path, run_id)
    messages = []
    for message in process.messages():
        messages.append(message)
        if (phase == "model load" and message == ("progress", "Loading the model", 0, 1)) or (
                phase == "training" and message[0] == "metrics" and message[1]["step"] == 4):
            process.stop_now()
    assert messages[-1] == ("finished", "stopped")
    assert store.get_run(project.db, run_id)["status"] == "stopped"
    resume_step = 0 if phase == "model load" else 3
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == ([3] if resume_step else [])
    assert f"from the last checkpoint (step {resume_step})" in messages[-2][1]

    project.db.execute("UPDATE runs SET config = json_set(config, '$.max_steps', ?) WHERE id = ?",
                       [resume_step + 2, run_id])  # resume briefly: the point is that it resumes
    assert runs.execute(project.path, run_id) == "completed"
    assert store.run_metrics(project.db, run_id)["loss"][0] == list(range(1, resume_step + 3))


def test_a_failure_in_the_child_arrives_as_a_readable_message(project, make_toy_run):
    run_id = make_toy_run(fail_at_step=1, failure="CUDA out of memory (simulated)")
    messages = list(RunProcess(project.path, run_id).messages())
    kind, text = messages[-1]
    assert kind == "failed" and "ran out of memory" in text
    assert any(m[0] == "log" and "Traceback" in m[1] for m in messages)  # the details go to the log
    assert store.get_run(project.db, run_id)["status"] == "failed"


def test_when_the_launching_process_dies_the_run_stops_at_a_step_with_a_checkpoint(project, make_toy_run):
    run_id = make_toy_run(max_steps=100000, checkpoint_every=100000)
    project.close()  # the store is shared through the file; this process only watches it
    parent = textwrap.dedent(f"""
        import os
        from studio.core import runs
        from studio.core.run_process import RunProcess
        runs.ENGINE_MODULES["toy"] = "tests.toy_engine"
        for message in RunProcess({str(project.path)!r}, {run_id}).messages():
            if message[0] == "metrics" and message[1]["step"] == 2:
                os._exit(0)  # the parent dies without stopping the run (as kill -9 would)
    """)
    # stderr dropped: the dead parent's resource tracker warns about the semaphores it never freed.
    subprocess.run([sys.executable, "-c", parent], cwd=ROOT, check=True, timeout=300, stderr=subprocess.DEVNULL)
    db = store.connect(project.path)
    try:
        deadline = time.monotonic() + 120
        while store.get_run(db, run_id)["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.get_run(db, run_id)["status"] == "stopped"
        assert store.checkpoints(db, run_id)[-1]["step"] >= 2
    finally:
        db.close()

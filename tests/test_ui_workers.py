"""RunWorker and RunQueue: signals, order, reorder, cancel, failures (toy engine, tiny model)."""

import pytest
from PySide6.QtCore import QThread, Qt

from studio.core import runs, store
from studio.ui.workers import RunQueue, RunWorker, describe_error, wait_for_background_jobs

TIMEOUT = 180_000  # generous: the CI cores are shared; waits end as soon as the signal comes


@pytest.fixture
def queue(qtbot, project):
    queue = RunQueue()
    queue.set_project(project.path)
    yield queue
    queue.stop_all()
    if queue.busy:
        with qtbot.waitSignal(queue.idle, timeout=TIMEOUT):
            pass
    qtbot.waitUntil(lambda: queue._thread is None, timeout=TIMEOUT)
    wait_for_background_jobs()


def test_worker_turns_callbacks_into_signals(qtbot, project, make_toy_run):
    run_id = make_toy_run()
    worker = RunWorker(project.path, run_id)
    thread = QThread()
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    worker.done.connect(thread.quit, Qt.ConnectionType.DirectConnection)  # as RunQueue does
    records, messages = [], []
    worker.metrics.connect(lambda rid, record: records.append((rid, record)))
    worker.log.connect(lambda rid, message: messages.append(message))
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT) as finished:
        thread.start()
    assert thread.wait(TIMEOUT)
    assert finished.args == [run_id, "completed"]
    assert [r["step"] for _rid, r in records] == [1, 2, 3, 4, 5, 6]
    assert {rid for rid, _r in records} == {run_id} and "loss" in records[0][1]
    assert any("Checkpoint saved at step 6" in m for m in messages)
    assert store.get_run(project.db, run_id)["status"] == "completed"


def test_pause_is_reported_when_the_run_really_waits_and_stop_keeps_a_checkpoint(qtbot, project, queue, make_toy_run):
    run_id = make_toy_run(max_steps=1000, checkpoint_every=500)
    queue.enqueue(run_id)
    queue.pause()  # honoured before the first step, after the model has loaded
    with qtbot.waitSignal(queue.paused, timeout=TIMEOUT) as paused:
        pass
    assert paused.args == [run_id] and queue.is_paused
    assert store.get_run(project.db, run_id)["status"] == "paused"
    steps = []
    queue.metrics.connect(lambda rid, record: steps.append(record["step"]))
    with qtbot.waitSignal(queue.resumed, timeout=TIMEOUT):
        queue.resume()
    qtbot.waitUntil(lambda: len(steps) >= 3, timeout=TIMEOUT)
    with qtbot.waitSignal(queue.finished, timeout=TIMEOUT) as finished:
        queue.stop()
    assert finished.args == [run_id, "stopped"]
    qtbot.waitUntil(lambda: not queue.busy, timeout=TIMEOUT)
    run = store.get_run(project.db, run_id)
    last = store.checkpoints(project.db, run_id)[-1]["step"]
    assert run["status"] == "stopped" and 3 <= last < 1000
    assert max(store.run_metrics(project.db, run_id)["loss"][0]) == last


def test_queue_runs_one_at_a_time_in_order_with_reorder_and_cancel(qtbot, project, queue, make_toy_run):
    first, second, third, fourth = (make_toy_run(max_steps=2, checkpoint_every=2) for _ in range(4))
    started, changes = [], []
    queue.started.connect(started.append)
    queue.queue_changed.connect(changes.append)

    queue.enqueue(first)
    queue.pause()  # hold the first run so the others wait
    for run_id in (second, third, fourth):
        assert queue.enqueue(run_id)
    assert not queue.enqueue(third)  # already waiting
    assert queue.current == first and queue.queued == [second, third, fourth]

    assert queue.move(fourth, -2)
    assert queue.queued == [fourth, second, third]
    queue.reorder([third, fourth, second])
    assert queue.queued == [third, fourth, second]
    with pytest.raises(ValueError):
        queue.reorder([third, fourth])
    with qtbot.waitSignal(queue.cancelled, timeout=TIMEOUT):
        assert queue.cancel(fourth)
    assert not queue.cancel(first)  # running, not waiting: stop it instead
    assert changes[-1] == [third, second]
    assert store.get_run(project.db, fourth)["status"] == "stopped"

    finished = []
    queue.finished.connect(lambda rid, status: finished.append((rid, status)))
    with qtbot.waitSignal(queue.idle, timeout=TIMEOUT):
        queue.resume()
    assert started == [first, third, second]
    assert finished == [(first, "completed"), (third, "completed"), (second, "completed")]
    assert store.get_run(project.db, fourth)["status"] == "stopped"
    assert not store.checkpoints(project.db, fourth)


def test_out_of_memory_becomes_a_failed_signal_with_advice_and_the_queue_goes_on(qtbot, project, queue, make_toy_run):
    failing = make_toy_run(fail_at_step=4,
                       failure="CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    with qtbot.waitSignal(queue.failed, timeout=TIMEOUT) as failed:
        queue.enqueue(failing)
    run_id, message = failed.args
    assert run_id == failing
    assert "ran out of memory" in message and "smaller batch size" in message and "max length" in message
    run = store.get_run(project.db, failing)
    assert run["status"] == "failed" and "out of memory" in run["error"]
    assert [c["step"] for c in store.checkpoints(project.db, failing)] == [3]  # the last checkpoint is intact

    qtbot.waitUntil(lambda: not queue.busy, timeout=TIMEOUT)
    healthy = make_toy_run(max_steps=2)
    with qtbot.waitSignal(queue.finished, timeout=TIMEOUT) as finished:
        queue.enqueue(healthy)
    assert finished.args == [healthy, "completed"]


def test_an_error_before_training_starts_still_marks_the_run_failed(qtbot, project, queue, monkeypatch, make_toy_run):
    run_id = make_toy_run()
    monkeypatch.setitem(runs.ENGINE_MODULES, "toy", "tests.no_such_engine")
    with qtbot.waitSignal(queue.failed, timeout=TIMEOUT) as failed:
        queue.enqueue(run_id)
    assert "no_such_engine" in failed.args[1]
    assert store.get_run(project.db, run_id)["status"] == "failed"


def test_describe_error_gives_advice_for_out_of_memory_and_keeps_user_messages():
    import torch

    oom = torch.cuda.OutOfMemoryError("Tried to allocate 20.00 MiB")
    assert "smaller batch size" in describe_error(oom)
    assert describe_error(runs.ConfigError("Cannot start this run:\n- no pairs")) == "Cannot start this run:\n- no pairs"
    assert describe_error(ValueError("bad value")) == "ValueError: bad value"

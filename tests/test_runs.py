"""Run control shared by the engines: status, checkpoints, eval samples, pause/stop/resume."""

import threading

import pytest

from studio.core import runs, store


def losses(db, run_id):
    return store.run_metrics(db, run_id)["loss"]


def test_run_completes_with_checkpoints_metrics_and_eval_samples(project, make_toy_run):
    run_id = make_toy_run()
    seen = []
    assert runs.execute(project.path, run_id, on_metrics=seen.append) == "completed"
    assert store.get_run(project.db, run_id)["status"] == "completed"
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [3, 6]
    steps, values = losses(project.db, run_id)
    assert steps == [1, 2, 3, 4, 5, 6] and values == [r["loss"] for r in seen]
    last = store.checkpoints(project.db, run_id)[-1]
    assert len(store.samples(project.db, last["id"])) == 4  # one greedy sample per eval prompt


def test_the_first_checkpoint_of_a_run_from_the_base_also_samples_the_base_once(project, make_toy_run):
    from studio.core.generation import Decoding, generate

    first = make_toy_run(max_steps=2, checkpoint_every=1)
    reports = []
    runs.execute(project.path, first, on_progress=lambda *report: reports.append(report))
    base_samples = store.samples(project.db, None)  # Compare's Base column reads these
    assert len(base_samples) == 4 and {s["decoding"]["max_new_tokens"] for s in base_samples} == {2}
    model, tokenizer = runs.load_model_state(project.db, None)
    prompts = {row["id"]: row["prompt"] for row in store.eval_prompts(project.db)}
    expected = generate(model, tokenizer, [prompts[s["prompt_id"]] for s in base_samples], Decoding(max_new_tokens=2))
    assert [s["text"] for s in base_samples] == [g.text for g in expected]
    assert [r for r in reports if r[0] == "Eval samples of the base"][-1] == ("Eval samples of the base", 4, 4)
    assert sum(r[0] == "Eval samples of the base" for r in reports) == 2  # at the first checkpoint only: 0/4, 4/4

    runs.execute(project.path, make_toy_run(max_steps=1, checkpoint_every=1))
    assert len(store.samples(project.db, None)) == 4  # stored once per project and decoding

def test_unknown_setting_is_refused(make_toy_run):
    with pytest.raises(runs.ConfigError, match="bogus"):
        runs.make_config("toy", {"bogus": 1})


def test_stop_then_resume_gives_the_same_metrics_as_an_uninterrupted_run(project, make_toy_run):
    straight = make_toy_run()
    runs.execute(project.path, straight)

    interrupted = make_toy_run()
    control = runs.RunControl()
    stop_after_four = lambda record: control.stop() if record["step"] == 4 else None
    assert runs.execute(project.path, interrupted, control, on_metrics=stop_after_four) == "stopped"
    assert [c["step"] for c in store.checkpoints(project.db, interrupted)] == [3, 4]
    assert runs.execute(project.path, interrupted) == "completed"
    assert losses(project.db, interrupted) == losses(project.db, straight)


def test_resume_discards_metrics_written_after_the_last_checkpoint(project, make_toy_run):
    run_id = make_toy_run()
    runs.execute(project.path, run_id)
    # Simulate a kill -9 after step 3's checkpoint: later metrics were flushed, no checkpoint 6.
    last = store.checkpoints(project.db, run_id)[-1]
    project.db.execute("DELETE FROM samples WHERE checkpoint_id = ?", [last["id"]])
    project.db.execute("DELETE FROM checkpoints WHERE id = ?", [last["id"]])
    project.db.conn.commit()
    expected = losses(project.db, run_id)
    runs.execute(project.path, run_id)
    assert losses(project.db, run_id) == expected  # no duplicated steps, same values


def test_pause_holds_between_steps_until_resumed(project, make_toy_run):
    run_id = make_toy_run(max_steps=4, checkpoint_every=10)
    control = runs.RunControl()
    paused_at = threading.Event()

    def pause_after_two(record):
        if record["step"] == 2:
            control.pause()
            paused_at.set()

    worker = threading.Thread(target=runs.execute, args=(project.path, run_id, control, pause_after_two))
    worker.start()
    assert paused_at.wait(30)
    worker.join(0.5)
    assert worker.is_alive()  # held by the pause
    assert store.get_run(store.connect(project.path), run_id)["status"] == "paused"
    control.resume()
    worker.join(30)
    assert store.get_run(project.db, run_id)["status"] == "completed"
    assert losses(project.db, run_id)[0] == [1, 2, 3, 4]


def test_failure_marks_run_failed_and_keeps_checkpoints(project, make_toy_run):
    run_id = make_toy_run(fail_at_step=4, failure="CUDA out of memory (simulated)")
    with pytest.raises(RuntimeError):
        runs.execute(project.path, run_id)
    run = store.get_run(project.db, run_id)
    assert run["status"] == "failed" and "out of memory" in run["error"]
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [3]


def test_export_merged_loads_with_transformers_alone(project, tmp_path, make_toy_run):
    from transformers import AutoModelForCausalLM

    run_id = make_toy_run(max_steps=3)
    runs.execute(project.path, run_id)
    checkpoint = store.checkpoints(project.db, run_id)[-1]
    merged = runs.export_merged(project.db, checkpoint["id"], tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged)
    state_model, _ = runs.load_model_state(project.db, checkpoint["id"])
    import torch
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(model(ids).logits, state_model(ids).logits, atol=1e-5)

"""What the shaping engines' tests share (PPO in test_ppo.py, GRPO and RLOO in test_grpo.py): training
prompts for the tiny model, metrics without wall-clock timings, and a run stopped and resumed."""

from studio.core import runs, store

TIMINGS = ("time/", "tokens_per_second", "step_seconds", "memory/")  # differ between two runs of one work


def add_prompts(project, count: int = 8) -> None:
    store.add_dataset(project.db, "prompts", "prompts", [{"prompt": f"Q{i}:"} for i in range(count)])


def comparable_metrics(db, run_id: int) -> dict:
    """The run's metrics without its timings: what two runs of the same work must agree on."""
    return {name: series for name, series in store.run_metrics(db, run_id).items() if not name.startswith(TIMINGS)}


def straight_and_interrupted(project, method: str, overrides: dict) -> tuple[int, int]:
    """Two completed runs of one config: one straight through, one stopped at step 3 and resumed
    after 3 more prompts were imported (a resumed run keeps the prompts it started with)."""
    straight = runs.create_run(project.db, runs.make_config(method, overrides))
    assert runs.execute(project.path, straight) == "completed"
    interrupted = runs.create_run(project.db, runs.make_config(method, overrides))
    control = runs.RunControl()
    stop_after_three = lambda record: control.stop() if record["step"] == 3 else None  # noqa: E731
    assert runs.execute(project.path, interrupted, control, on_metrics=stop_after_three) == "stopped"
    add_prompts(project, 3)
    assert runs.execute(project.path, interrupted) == "completed"
    return straight, interrupted

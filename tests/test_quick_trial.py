"""The advisor's quick trial: shaping with the judged run's method (PPO, GRPO or RLOO) beside DPO."""

import pytest

from studio.core import advisor, store


QUIZ = [{"prompt": [{"role": "user", "content": "Name a fruit."}]}, {"prompt": [{"role": "user", "content": "Sky?"}]}]


def shaping_run_with_a_checkpoint(db, method: str, sources: list[dict]) -> tuple[int, int]:
    """A finished run of `method` on `sources`, with one checkpoint (its record: nothing is trained)."""
    from studio.core import runs

    config = runs.make_config(method, {"reward_sources": sources})
    run_id = store.create_run(db, method, config.to_json(), status="completed")
    return run_id, store.add_checkpoint(db, run_id, 4, f"runs/{run_id}/checkpoint-4")


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_quick_trial_shapes_with_the_method_and_sources_of_the_judged_run(project, method):
    db = project.db
    store.add_dataset(db, "train", "prompts", QUIZ)
    store.add_dataset(db, "pairs", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    sources = [{"type": "forbidden_words", "name": "no_as_an_ai", "words": ["As an AI"], "weight": 2.0}]
    run_id, checkpoint_id = shaping_run_with_a_checkpoint(db, method, sources)

    shaping, settling = (store.get_run(db, i) for i in advisor.create_quick_trial(db, checkpoint_id, steps=4))
    assert (shaping["method"], settling["method"]) == (method, "dpo")
    assert shaping["name"] == f"Trial {method.upper()} from {advisor.state_name(db, checkpoint_id)}"
    assert shaping["config"]["reward_sources"] == sources
    assert {r["parent_checkpoint_id"] for r in (shaping, settling)} == {checkpoint_id}
    assert {(r["config"]["max_steps"], r["config"]["seed"]) for r in (shaping, settling)} == {(4, 0)}

    # From the base while the run is judged: the judged run still picks the method and the sources.
    shaping_id, _ = advisor.create_quick_trial(db, None, steps=4, judged_run_id=run_id)
    from_base = store.get_run(db, shaping_id)
    assert (from_base["method"], from_base["parent_checkpoint_id"]) == (method, None)
    assert from_base["config"]["reward_sources"] == sources


def test_quick_trial_shapes_with_ppo_when_no_shaping_run_is_judged(project):
    db = project.db
    store.add_dataset(db, "train", "prompts", QUIZ)
    store.add_dataset(db, "pairs", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    shaping_id, _ = advisor.create_quick_trial(db, None, steps=4)
    assert store.get_run(db, shaping_id)["method"] == "ppo"
    assert [advisor.trial_method(m) for m in ("ppo", "grpo", "rloo", "dpo", None)] == ["ppo", "grpo", "rloo", "ppo", "ppo"]

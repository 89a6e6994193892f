"""The demo walkthrough (studio/core/story.py) end to end on the tiny model, stopping and continuing."""

import pytest

from studio.core import datasets, runs, store, story
from studio.core.demo import DEMO_FILES, RESOURCES

TINY_RUN = {"eval_max_new_tokens": 8, "lora_r": 2, "lora_alpha": 4}


@pytest.fixture
def demo_on_tiny(tmp_path, tiny_model_dir, monkeypatch):
    """The demo project's data on the tiny model, with short runs and answers. (A checkpoint every
    step would leave the advisor no early reward slope: its explanation then fails to format.)"""
    from studio.core import advisor

    monkeypatch.setattr(story, "PPO_SETTINGS", {"max_steps": 6, "checkpoint_every": 3, "prompts_per_step": 2,
                                                "max_new_tokens": 8, **TINY_RUN})
    monkeypatch.setattr(story, "DPO_SETTINGS", {"max_steps": 2, "checkpoint_every": 1, "batch_size": 2, **TINY_RUN})
    monkeypatch.setattr(advisor, "SAMPLING", {**advisor.SAMPLING, "max_new_tokens": 8})
    path = tmp_path / "demo"
    with store.Project.create(path, base_model={"kind": "folder", "path": str(tiny_model_dir)}) as project:
        for file_name, kind, is_eval in DEMO_FILES:
            datasets.import_file(project.db, RESOURCES / file_name, kind=kind, as_eval=is_eval)
    return path


def test_reward_choice_prefers_the_higher_reward_and_ties_equal_ones():
    assert story.reward_choice(1.5, 0.5) == "a"
    assert story.reward_choice(-1.0, 0.2) == "b"
    assert story.reward_choice(0.7, 0.7) == "tie"


def test_the_walkthrough_runs_every_stage_and_settles_from_a_ppo_checkpoint(demo_on_tiny):
    lines = []
    times = story.Story(demo_on_tiny, say=lines.append, control=runs.RunControl()).run()
    assert list(times) == [key for key, _ in story.STAGES]
    with store.Project.open(demo_on_tiny, read_only=True) as project:
        db = project.db
        ppo = story.find_run(db, story.PPO_RUN)
        dpo = story.find_run(db, story.DPO_RUN)
        assert ppo["status"] == dpo["status"] == "completed"
        assert dpo["parent_checkpoint_id"] in [c["id"] for c in store.checkpoints(db, ppo["id"])]
        labels = store.effective_labels(db)
        assert len(labels) == story.PAIRS_TO_LABEL
        assert {label["annotator"] for label in labels} == {story.REWARD_ANNOTATOR}
        assert all(story.stage_status(db).values())
    assert any(line.startswith("   advisor: ") for line in lines)
    assert sum("breaking a rule" in line for line in lines) == 3  # base, PPO, PPO then DPO


def test_a_stop_keeps_what_is_done_and_the_same_call_continues(demo_on_tiny):
    control = runs.RunControl()
    lines = []

    def say(line):
        lines.append(line)
        if "pair 3/" in line:
            control.stop()  # as Ctrl-C would, in the middle of labelling

    with pytest.raises(story.Stopped):
        story.Story(demo_on_tiny, say=say, control=control).run()
    with store.Project.open(demo_on_tiny, read_only=True) as project:
        assert story.story_labels(project.db) == 3
        assert story.stage_status(project.db)["ppo"] and not story.stage_status(project.db)["dpo"]
    again = []
    story.Story(demo_on_tiny, say=again.append, control=runs.RunControl()).run()
    assert "   done before: the base is sampled" in again
    assert any(line.startswith("   done before: run #") for line in again)  # PPO not trained twice
    assert any("pair 4/10" in line for line in again) and not any("pair 3/10" in line for line in again)
    with store.Project.open(demo_on_tiny, read_only=True) as project:
        assert story.story_labels(project.db) == story.PAIRS_TO_LABEL
        assert len([r for r in store.list_runs(project.db) if r["method"] == "ppo"]) == 1

"""The one settings validator: every bad field is named with its reason before a run exists."""

import pytest

from studio.core import runs, settings, store

BAD_SETTINGS = [
    # (method, field, value, words the message must hold)
    ("dpo", "checkpoint_every", 0, "must be at least 1"),
    ("dpo", "lr_scheduler", "bogus", "must be one of linear, constant, cosine"),
    ("dpo", "learning_rate", "abc", "expected a number, got 'abc'"),
    ("ppo", "lora_r", 0, "must be at least 1"),
    ("dpo", "eval_max_new_tokens", -1, "must be at least 1"),
    ("dpo", "device", "cuda:7", "no such device"),
    ("dpo", "device", "tpu", "unknown device 'tpu'"),
    ("dpo", "warmup_steps", -3, "must not be negative"),
    ("dpo", "dataset_ids", "1", "expected a list of ids like [1, 2] or null (none), got '1'"),
    ("ppo", "prompt_dataset_ids", [1, "x"], "expected a list of ids like [1, 2]"),
    ("dpo", "max_steps", True, "expected a whole number"),
    ("dpo", "bogus", 1, "unknown setting"),
]


@pytest.mark.parametrize("method, field, value, words", BAD_SETTINGS)
def test_each_bad_setting_is_named_with_its_reason(method, field, value, words):
    problems = settings.validate_settings(method, {field: value})
    assert list(problems) == [field]
    assert words in problems[field]


def test_good_settings_pass():
    assert settings.validate_settings("dpo", runs.make_config("dpo").to_json()) == {}
    assert settings.validate_settings("ppo", runs.make_config("ppo").to_json()) == {}


def test_lora_targets_are_checked_against_the_models_modules():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    assert settings.target_modules_problem(["q_proj", "up_proj"], names) is None
    assert settings.target_modules_problem("all-linear", names) is None
    assert settings.target_modules_problem(r".*\.q_proj", names) is None
    problem = settings.target_modules_problem(["q_proj", "nope"], names)
    assert problem.startswith("'nope' matches none of the model's modules") and "up_proj" in problem
    assert "matches none" in settings.target_modules_problem("nope", names)
    assert "regular expression" in settings.target_modules_problem("(", names)


def test_make_config_refuses_before_any_run_exists_and_names_every_field(project):
    with pytest.raises(runs.SettingsError) as caught:
        runs.make_config("dpo", {"checkpoint_every": 0, "learning_rate": "abc"})
    assert set(caught.value.fields) == {"checkpoint_every", "learning_rate"}
    assert "checkpoint_every: must be at least 1" in str(caught.value)
    assert store.list_runs(project.db) == []


def test_create_run_checks_target_modules_against_the_projects_base(project):
    store.add_dataset(project.db, "pairs", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    config = runs.make_config("dpo", {"lora_target_modules": ["nope"]})
    with pytest.raises(runs.SettingsError) as caught:
        runs.create_run(project.db, config)
    assert list(caught.value.fields) == ["lora_target_modules"]
    assert store.list_runs(project.db) == []
    runs.create_run(project.db, runs.make_config("dpo", {"lora_target_modules": ["q_proj"]}))


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "bell\a"])
def test_a_run_name_must_be_one_printable_line(project, name):
    store.add_dataset(project.db, "pairs", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(runs.ConfigError, match="one line of printable text"):
        runs.create_run(project.db, runs.make_config("dpo"), name=name)


def test_cli_train_reports_bad_settings_without_a_traceback(project, capsys):
    from studio.cli import main

    path = str(project.path)
    project.close()
    code = main(["train", path, "--method", "dpo", "--set", "checkpoint_every=0", "--set", "learning_rate=abc"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("studio: error: Cannot use these settings")
    assert "checkpoint_every: must be at least 1" in err and "Traceback" not in err
    with store.Project.open(path, read_only=True) as reopened:
        assert store.list_runs(reopened.db) == []

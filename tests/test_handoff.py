"""Hand-off jobs: every exported flag exists in the engine's parser at the pinned version, and every
setting of the run is either mapped or listed as having no equivalent."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from studio.core import handoff, rewards, runs, store

KNOWN = Path(__file__).parent / "data" / "handoff"


def known_flags(name: str) -> set[str]:
    lines = (KNOWN / name).read_text().splitlines()
    assert lines[0].startswith("# ") and ("v0.11.0" in lines[0] or "v0.7.0" in lines[0] or "TRL 1.16.0" in lines[0])
    return set(lines[1:])


def add_data(project):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": "No."}]} for i in range(6)])
    store.add_dataset(project.db, "prompts", "prompts", [{"prompt": f"Say {i}."} for i in range(5)])


def export(project, tmp_path, engine, method, **overrides):
    run_id = runs.create_run(project.db, runs.make_config(method, overrides))
    return handoff.export_job(project.path, run_id, engine, tmp_path / f"{engine}-{method}")


def accounted_for(config, job: dict) -> set[str]:
    """The config fields named in the script header: mapped or listed as unmapped."""
    named = " ".join(setting for setting in job["mapping"]) + " " + " ".join(job["unmapped"])
    words = set(named.replace(",", " ").replace("(", " ").split())
    return {f.name for f in dataclasses.fields(config)} - words


def header_settings(script: Path) -> dict:
    lines = script.read_text().splitlines()
    mapped = [line[4:].split(" -> ")[0] for line in lines if line.startswith("#   ") and " -> " in line]
    unmapped = [line[4:].split(":")[0] for line in lines if line.startswith("#   ") and " -> " not in line]
    return {"mapping": mapped, "unmapped": unmapped}


@pytest.mark.parametrize("method,known,overrides", [
    ("dpo", "openrlhf-train_dpo.txt", {"loss_type": "ipo", "max_prompt_length": 64}),
    ("ppo", "openrlhf-train_ppo_ray.txt", {"adaptive_kl": True, "reward_clip": 5.0, "reward_normalization": True})])
def test_openrlhf_flags_exist_in_its_parser(project, tmp_path, method, known, overrides):
    add_data(project)
    script = export(project, tmp_path, "openrlhf", method, **overrides)
    flags = set(json.loads((script.parent / "studio_job.json").read_text())["flags"])
    assert flags and flags - known_flags(known) == set()
    assert "--model.betta" not in known_flags(known)  # the list is a real parser's, not a catch-all
    config = runs.make_config(method)
    assert accounted_for(config, header_settings(script)) == set()


def test_verl_overrides_exist_in_its_hydra_config(project, tmp_path):
    add_data(project)
    script = export(project, tmp_path, "verl", "ppo", lora_target_modules=["q_proj", "v_proj"])
    job = json.loads((script.parent / "studio_job.json").read_text())
    assert set(job["flags"]) - known_flags("verl-main_ppo.txt") == set()
    assert accounted_for(runs.make_config("ppo"), header_settings(script)) == set()
    assert "actor_rollout_ref.model.target_modules='[q_proj,v_proj]'" in script.read_text()
    table = pq.read_table(script.parent / "data" / "train.parquet").to_pylist()
    assert len(table) == 5 and table[0]["prompt"] == [{"role": "user", "content": "Say 0."}]
    assert table[0]["reward_model"] == {"style": "rule", "ground_truth": ""}


def test_verl_refuses_dpo_clearly(project, tmp_path):
    add_data(project)
    with pytest.raises(handoff.HandoffError, match="verl has no offline DPO"):
        export(project, tmp_path, "verl", "dpo")
    assert not (tmp_path / "verl-dpo").exists()


def test_trl_dpo_config_keys_exist_in_trl(project, tmp_path):
    add_data(project)
    script = export(project, tmp_path, "trl", "dpo", loss_type="ipo", batch_size=4, max_prompt_length=64)
    config = yaml.safe_load((script.parent / "dpo.yaml").read_text())
    assert set(config) - known_flags("trl-dpo.txt") == set()
    assert config["loss_type"] == "ipo" and config["lr_scheduler_type"] == "linear"
    assert "per_device_train_batch_size" in known_flags("trl-dpo.txt")
    text = script.read_text()
    assert "max_prompt_length: TRL 1.16 has no prompt-length limit" in text
    assert accounted_for(runs.make_config("dpo"), header_settings(script)) == set()
    rows = [json.loads(line) for line in (script.parent / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "chosen", "rejected"}


def test_reward_file_scores_as_the_studio_does(project, tmp_path):
    add_data(project)
    script = export(project, tmp_path, "verl", "ppo")
    spec = importlib.util.spec_from_file_location("exported_reward", script.parent / "reward_fn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sources = runs.make_config("ppo").reward_sources
    tokenizer = runs.load_model_state(project.db, None)[1]
    responses = ["Sure, it is 4.", "- a\n- b", ""]
    expected, _ = rewards.RewardFunction(sources, tokenizer, project.path)(["Q?"] * 3, responses)
    got = [module.compute_score("studio", r, "", {"prompt": json.dumps("Q?")}) for r in responses]
    assert got == pytest.approx(expected.tolist())
    batch = module.reward_func(["Q?" + r for r in responses], ["Q?"] * 3, [""] * 3)
    assert batch["rewards"].tolist() == pytest.approx(expected.tolist())


def test_openrlhf_refuses_a_dpo_loss_it_does_not_have(project, tmp_path):
    add_data(project)
    with pytest.raises(handoff.HandoffError, match="no 'hinge' DPO loss"):
        export(project, tmp_path, "openrlhf", "dpo", loss_type="hinge")
    assert not (tmp_path / "openrlhf-dpo").exists() and not (tmp_path / "openrlhf-dpo.partial").exists()

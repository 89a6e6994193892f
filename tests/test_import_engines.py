"""OpenRLHF and verl output folders come back as runs: their LoRA checkpoints and their logs.

The folders are built here with the layout each engine writes at the pinned version (see
studio/core/engine_outputs.py and docs/scale-out.md): adapters made with PEFT on the tiny model,
saved as OpenRLHF does (PEFT save_pretrained) or as verl does (safetensors of the LoRA state dict
and its LoraConfig as JSON), metrics as TensorBoard events or verl's file-logger JSONL.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from studio.core import bundles, engine_outputs, handoff, runs, store
from studio.core.tiny import build_tiny_model_folder

TARGETS = ["q_proj", "v_proj"]


def peft_model(base: Path, rank: int = 4, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    # init_lora_weights=False: lora_B is random too, so the adapter changes the model's outputs
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config)


def save_like_openrlhf(base: Path, out: Path, **kwargs) -> Path:
    """OpenRLHF's DeepspeedStrategy.save_model for a PEFT model: save_pretrained, config.json, tokenizer."""
    from transformers import AutoTokenizer

    model = peft_model(base, **kwargs)
    model.save_pretrained(out)
    model.config.to_json_file(out / "config.json")
    AutoTokenizer.from_pretrained(base).save_pretrained(out)  # tokenizer_config.json: written last
    return out


def save_like_verl(base: Path, actor: Path, **kwargs) -> Path:
    """verl's fsdp_workers save_checkpoint with LoRA: actor/lora_adapter/ with the LoRA state dict and
    asdict(LoraConfig) (enums as their values), beside the FSDP shards and huggingface/."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = peft_model(base, **kwargs)
    adapter = actor / "lora_adapter"
    adapter.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              adapter / "adapter_model.safetensors")
    config = asdict(model.peft_config["default"])
    for key in ("task_type", "peft_type"):
        config[key] = getattr(config[key], "value", config[key])
    config["target_modules"] = list(config["target_modules"])
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=4))
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"fsdp shard")
    (actor / "huggingface").mkdir()
    model.config.to_json_file(actor / "huggingface" / "config.json")
    return adapter


def write_events(folder: Path, scalars: dict[str, list[float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(folder)
    for tag, values in scalars.items():
        for step, value in enumerate(values, 1):
            writer.add_scalar(tag, value, step)
    writer.close()


def add_data(project):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": "No."}]} for i in range(6)])
    store.add_dataset(project.db, "prompts", "prompts", [{"prompt": f"Say {i}."} for i in range(5)])


def export(project, tmp_path, engine, method, **overrides) -> Path:
    run_id = runs.create_run(project.db, runs.make_config(method, {"max_steps": 4, "checkpoint_every": 2, **overrides}))
    return handoff.export_job(project.path, run_id, engine, tmp_path / f"{engine}-job").parent


def openrlhf_dpo_output(project, tmp_path, base: Path) -> Path:
    """An exported OpenRLHF DPO job's output/ after 4 steps with --ckpt.save_steps 2."""
    output = export(project, tmp_path, "openrlhf", "dpo") / "output"
    save_like_openrlhf(base, output / "checkpoints" / "global_step2_hf", seed=2)
    (output / "checkpoints" / "global_step2").mkdir()  # DeepSpeed's own checkpoint: not an adapter
    (output / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed")
    save_like_openrlhf(base, output, seed=4)  # the final save, after fit()
    write_events(output / "tensorboard" / "exp_1202T01:00", {
        "train/loss_mean": [0.69, 0.62, 0.55, 0.50], "train/loss": [0.7, 0.6, 0.5, 0.4],
        "train/acc_mean": [0.5, 0.5, 1.0, 1.0], "train/lr": [1e-4] * 4, "train/chosen_reward": [0.0, 0.1, 0.2, 0.3]})
    return output


def verl_output(project, tmp_path, base: Path) -> Path:
    """An exported verl PPO job's output/: checkpoints at steps 2 and 4 (the last), a step-6 folder
    still being written, and the file logger's JSONL."""
    output = export(project, tmp_path, "verl", "ppo") / "output"
    for step in (2, 4):
        save_like_verl(base, output / f"global_step_{step}" / "actor", seed=step)
        (output / f"global_step_{step}" / "data.pt").write_bytes(b"dataloader")
    (output / "latest_checkpointed_iteration.txt").write_text("4")
    (output / "global_step_6" / "actor" / "lora_adapter").mkdir(parents=True)
    (output / "global_step_6" / "actor" / "lora_adapter" / "adapter_model.safetensors").write_bytes(b"\x10")
    lines = [{"step": step, "data": {"actor/pg_loss": -0.1 * step, "critic/score/mean": 0.2 * step,
                                     "critic/rewards/mean": 0.2 * step - 0.01, "actor/reward_kl_penalty": 0.01,
                                     "response_length/mean": 10.0 + step, "timing_s/gen": 1.5}}
             for step in (1, 2, 3, 4)]
    (output / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return output


def logits(model, text="Hello"):
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_loads_as(db, checkpoint: dict, adapter: Path, base: Path) -> None:
    """The imported checkpoint, loaded the way compare loads it, is the base with `adapter` merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded, _ = runs.load_model_state(db, checkpoint["id"])
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(base)
    assert not torch.allclose(logits(expected), logits(plain))  # the adapter does change the model
    assert torch.allclose(logits(loaded), logits(expected), atol=1e-5)


def project_files(project) -> set[str]:
    return {p.relative_to(project.path).as_posix() for p in (project.path / "runs").rglob("*")} \
        if (project.path / "runs").exists() else set()


def test_an_openrlhf_dpo_output_imports_its_checkpoints_and_tensorboard_log(project, tiny_model_dir, tmp_path):
    add_data(project)
    output = openrlhf_dpo_output(project, tmp_path, tiny_model_dir)
    run_id = bundles.import_run(project.db, project.path, output)
    assert bundles.import_run(project.db, project.path, output) == run_id  # again: the same run, unchanged

    metrics = store.run_metrics(project.db, run_id)
    assert metrics["loss"] == ([1, 2, 3, 4], pytest.approx([0.69, 0.62, 0.55, 0.50]))  # loss_mean, not loss
    assert metrics["rewards/accuracies"][1] == [0.5, 0.5, 1.0, 1.0]
    assert metrics["learning_rate"][1] == pytest.approx([1e-4] * 4)
    assert metrics["train/chosen_reward"][1] == pytest.approx([0.0, 0.1, 0.2, 0.3])  # no counterpart: kept
    assert metrics["train/loss"][1] == pytest.approx([0.7, 0.6, 0.5, 0.4])

    run = store.get_run(project.db, run_id)
    assert run["method"] == "dpo" and run["status"] == "completed" and run["name"].endswith("(OpenRLHF)")
    checkpoints = store.checkpoints(project.db, run_id)
    assert [c["step"] for c in checkpoints] == [2, 4]  # the final save is the last logged step's model
    assert json.loads(checkpoints[0]["base_identity"])["hash"] == runs.base_identity(
        runs.ModelSource("folder", str(tiny_model_dir)))["hash"]
    assert_loads_as(project.db, checkpoints[0], output / "checkpoints" / "global_step2_hf", tiny_model_dir)
    assert_loads_as(project.db, checkpoints[1], output, tiny_model_dir)
    assert len(store.list_runs(project.db)) == 2  # the exported run and the imported one


def test_a_verl_output_imports_its_lora_checkpoints_and_file_log(project, tiny_model_dir, tmp_path):
    add_data(project)
    output = verl_output(project, tmp_path, tiny_model_dir)
    run_id = bundles.import_run(project.db, project.path, output)
    assert bundles.import_run(project.db, project.path, output) == run_id

    metrics = store.run_metrics(project.db, run_id)
    assert metrics["loss/policy_avg"] == ([1, 2, 3, 4], pytest.approx([-0.1, -0.2, -0.3, -0.4]))
    assert metrics["objective/scores"][1] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert metrics["objective/rlhf_reward"][1] == pytest.approx([0.19, 0.39, 0.59, 0.79])
    assert metrics["response_length_mean"][1] == pytest.approx([11, 12, 13, 14])
    assert metrics["actor/reward_kl_penalty"][1] == pytest.approx([0.01] * 4)  # per token, not objective/kl's sum
    assert "critic/score/mean" not in metrics

    run = store.get_run(project.db, run_id)
    assert run["method"] == "ppo" and run["status"] == "completed"  # step 4 is trainer.total_training_steps
    checkpoints = store.checkpoints(project.db, run_id)
    assert [c["step"] for c in checkpoints] == [2, 4]  # step 6 is past latest_checkpointed_iteration.txt
    assert_loads_as(project.db, checkpoints[1], output / "global_step_4" / "actor" / "lora_adapter", tiny_model_dir)


def test_a_verl_run_still_training_imports_what_is_whole_and_says_running(project, tiny_model_dir, tmp_path):
    add_data(project)
    output = verl_output(project, tmp_path, tiny_model_dir)
    (output / "latest_checkpointed_iteration.txt").write_text("2")
    with open(output / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "data": {"actor/pg_')  # the logger is mid-line
    run_id = bundles.import_run(project.db, project.path, output)
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [2]
    assert store.get_run(project.db, run_id)["status"] == "running"
    assert store.run_metrics(project.db, run_id)["loss/policy_avg"][0] == [1, 2, 3, 4]

    (output / "latest_checkpointed_iteration.txt").write_text("4")  # training goes on: the next import
    assert bundles.import_run(project.db, project.path, output) == run_id
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [2, 4]
    assert store.get_run(project.db, run_id)["status"] == "completed"


def test_a_truncated_adapter_is_refused_by_name_and_nothing_is_imported(project, tiny_model_dir, tmp_path):
    add_data(project)
    output = verl_output(project, tmp_path, tiny_model_dir)
    weights = output / "global_step_4" / "actor" / "lora_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    runs_before = store.list_runs(project.db)
    with pytest.raises(bundles.BundleError, match=f"{weights} is truncated"):
        bundles.import_run(project.db, project.path, output)
    assert store.list_runs(project.db) == runs_before and project_files(project) == set()
    assert store.get_setting(project.db, bundles.IMPORTED_KEY, {}) == {}


def test_an_adapter_for_another_model_is_refused(project, tmp_path):
    other_base = build_tiny_model_folder(tmp_path / "wider", hidden_size=48)
    output = tmp_path / "openrlhf-out"
    save_like_openrlhf(other_base, output)  # no studio_job.json: only the weights' shapes can tell
    with pytest.raises(bundles.BundleError, match="q_proj.lora_A.weight has shape .*trained on another base"):
        bundles.import_run(project.db, project.path, output)
    assert store.list_runs(project.db) == [] and project_files(project) == set()


def test_a_job_exported_from_another_base_is_refused_even_with_the_same_shapes(project, tiny_model_dir, tmp_path):
    other_base = build_tiny_model_folder(tmp_path / "retrained", seed=1)  # same architecture, other weights
    other = store.Project.create(tmp_path / "other", base_model={"kind": "folder", "path": str(other_base)})
    add_data(other)
    output = openrlhf_dpo_output(other, tmp_path, other_base)
    other.close()
    with pytest.raises(runs.BaseModelChangedError, match="studio_job.json: the job was exported from a project whose base"):
        bundles.import_run(project.db, project.path, output)
    assert store.list_runs(project.db) == []


def test_a_verl_folder_without_lora_checkpoints_is_refused(project, tmp_path):
    output = tmp_path / "verl-out"
    (output / "global_step_2" / "actor").mkdir(parents=True)
    (output / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"fsdp shard")
    (output / "latest_checkpointed_iteration.txt").write_text("2")
    with pytest.raises(bundles.BundleError, match=r"no checkpoint up to step 2 .*has a LoRA adapter.*lora_rank > 0"):
        bundles.import_run(project.db, project.path, output)
    assert store.list_runs(project.db) == []


def test_a_verl_step_whose_lora_save_failed_is_left_out(project, tiny_model_dir, tmp_path):
    add_data(project)
    output = verl_output(project, tmp_path, tiny_model_dir)
    shutil.rmtree(output / "global_step_2" / "actor" / "lora_adapter")  # verl logs the error and goes on
    run_id = bundles.import_run(project.db, project.path, output)
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [4]


def test_an_openrlhf_folder_with_nothing_whole_yet_is_refused(project, tiny_model_dir, tmp_path):
    output = tmp_path / "openrlhf-out"
    save_like_openrlhf(tiny_model_dir, output / "checkpoints" / "global_step2_hf")
    (output / "checkpoints" / "global_step2_hf" / "tokenizer_config.json").unlink()  # still being saved
    with pytest.raises(bundles.BundleError, match="OpenRLHF output with no whole checkpoint and no log yet: nothing to import"):
        bundles.import_run(project.db, project.path, output)
    assert store.list_runs(project.db) == []


@pytest.mark.parametrize("change,message", [
    ({"r": 0}, "LoRA rank r = 0; it must be a whole number above 0"),
    ({"target_modules": ["wq"]}, "target module 'wq' is no linear layer of the project's base model"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'; the studio imports LoRA adapters only")])
def test_an_unusable_adapter_config_is_refused(project, tiny_model_dir, tmp_path, change, message):
    output = save_like_openrlhf(tiny_model_dir, tmp_path / "openrlhf-out")
    config = json.loads((output / "adapter_config.json").read_text())
    (output / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(bundles.BundleError, match=message):
        bundles.import_run(project.db, project.path, output)
    assert store.list_runs(project.db) == []


def test_a_pickle_adapter_is_refused_with_the_reason(project, tiny_model_dir, tmp_path):
    output = save_like_openrlhf(tiny_model_dir, tmp_path / "openrlhf-out")
    (output / "adapter_model.safetensors").rename(output / "adapter_model.bin")  # what ZeRO-3 saves
    with pytest.raises(bundles.BundleError, match="adapter_model.bin: a pickle adapter .*--ds.zero_stage 2"):
        bundles.import_run(project.db, project.path, output)


def test_a_folder_of_no_known_kind_names_what_was_looked_for(project, tmp_path):
    (tmp_path / "logs").mkdir()
    write_events(tmp_path / "logs", {"train/loss": [1.0]})
    with pytest.raises(bundles.BundleError) as error:
        bundles.import_run(project.db, project.path, tmp_path / "logs")
    for kind in ("manifest.json", "trainer_state.json", "global_step_<N>/", "global_step<N>_hf/"):
        assert kind in str(error.value)
    assert store.list_runs(project.db) == []


def test_exported_jobs_write_their_logs_where_import_reads_them(project, tmp_path):
    add_data(project)
    openrlhf = export(project, tmp_path, "openrlhf", "dpo")
    flags = json.loads((openrlhf / "studio_job.json").read_text())["flags"]
    assert flags["--ckpt.path"] == "output/checkpoints" and flags["--logger.tensorboard_dir"] == "output/tensorboard"
    shutil.rmtree(openrlhf)
    verl = export(project, tmp_path, "verl", "ppo")
    script = (verl / "launch.sh").read_text()
    assert "trainer.logger='[console,file]'" in script
    assert 'export VERL_FILE_LOGGER_PATH="$PWD/output/metrics.jsonl"' in script
    job = json.loads((verl / "studio_job.json").read_text())
    assert job["base_identity"] == runs.base_identity(runs.ModelSource.from_json(store.get_setting(project.db, "base_model")))


STORE_NAMES = {"actor/pg_loss": "loss/policy_avg", "critic/score/mean": "objective/scores"}  # the others are kept
metric_names = st.sampled_from(["actor/pg_loss", "critic/score/mean", "actor/ppo_kl", "timing_s/gen", "val-core/acc"])
verl_steps = st.lists(st.dictionaries(metric_names, st.floats(-1e6, 1e6), min_size=1), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(steps=verl_steps, cut=st.integers(min_value=0, max_value=10 ** 6))
def test_a_verl_log_cut_anywhere_gives_its_complete_lines_under_the_store_names(steps, cut):
    import tempfile

    lines = [json.dumps({"step": step, "data": data}) + "\n" for step, data in enumerate(steps, 1)]
    text = "".join(lines)
    cut = cut % (len(text) + 1)  # the logger may be anywhere in its buffer when the import reads
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "latest_checkpointed_iteration.txt").write_text("0")  # no checkpoint yet
        (Path(folder) / "metrics.jsonl").write_text(text[:cut])
        output = engine_outputs.read_verl(Path(folder))
    complete = text[:cut].count("\n")
    expected = [{"step": step, **{STORE_NAMES.get(name, name): value for name, value in data.items()}}
                for step, data in enumerate(steps[:complete], 1)]
    assert output.records == expected and output.checkpoints == {}


def test_a_job_from_a_checkpoint_imports_on_top_of_it_in_its_project_only(project, tmp_path):
    add_data(project)
    first = runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 2, "checkpoint_every": 2,
                                                                 "eval_max_new_tokens": 2, "learning_rate": 1e-2}))
    assert runs.execute(project.path, first) == "completed"
    parent = store.checkpoints(project.db, first)[-1]["id"]
    base_model, _ = runs.load_model_state(project.db, None)
    parent_model, _ = runs.load_model_state(project.db, parent)
    assert not torch.allclose(logits(base_model), logits(parent_model), atol=1e-4)  # dropping it would show
    job = export(project, tmp_path, "openrlhf", "dpo", parent_checkpoint_id=parent)
    output = save_like_openrlhf(job / "model", job / "output")  # the engine trains on the merged model/
    run_id = bundles.import_run(project.db, project.path, output)
    assert store.get_run(project.db, run_id)["parent_checkpoint_id"] == parent
    [checkpoint] = store.checkpoints(project.db, run_id)
    assert_loads_as(project.db, checkpoint, output, job / "model")  # base + parent + the engine's adapter

    elsewhere = store.Project.create(tmp_path / "elsewhere", base_model=store.get_setting(project.db, "base_model"))
    with pytest.raises(bundles.BundleError, match=f"model is checkpoint {parent} of project .*import it into that"):
        bundles.import_run(elsewhere.db, elsewhere.path, output)
    assert store.list_runs(elsewhere.db) == []
    elsewhere.close()


def test_the_cli_imports_an_engine_folder_and_names_a_damaged_job_file(tiny_model_dir, tmp_path, capsys):
    from studio.cli import main

    project = store.Project.create(tmp_path / "project", base_model={"kind": "folder", "path": str(tiny_model_dir)})
    add_data(project)
    output = verl_output(project, tmp_path, tiny_model_dir)
    project.close()  # the command opens it
    assert main(["import-run", str(project.path), str(output)]) == 0
    assert f"Imported {output} as run 2" in capsys.readouterr().out
    (output.parent / "studio_job.json").write_text('{"engine": "verl", ')
    assert main(["import-run", str(project.path), str(output)]) == 2
    assert f"{output.parent / 'studio_job.json'} is not valid JSON" in capsys.readouterr().err

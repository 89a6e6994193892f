"""Exports other tools load: GGUF (read back by gguf's reader and by transformers), the Ollama
Modelfile, and the model card every export carries."""

import hashlib
import json

import pytest

from studio.core import export, runs, store


@pytest.fixture
def checkpoint_id(project, make_toy_run):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    run_id = make_toy_run(max_steps=2, checkpoint_every=2, dataset_ids=None)
    runs.execute(project.path, run_id)
    return store.checkpoints(project.db, run_id)[-1]["id"]


@pytest.fixture
def make_toy_run(monkeypatch, make_toy_run):
    """The toy engine, given the DPO engine's data setting, so the card lists the data it names."""
    import dataclasses

    from tests import toy_engine

    @dataclasses.dataclass
    class Config(toy_engine.Config):
        dataset_ids: list[int] | None = None
        include_labels: bool = True

    monkeypatch.setattr(toy_engine, "Config", Config)
    return make_toy_run


def test_gguf_reads_back_with_the_architecture_every_tensor_and_the_chat_template(
        project, checkpoint_id, tmp_path, tiny_model_dir):
    import gguf
    from safetensors import safe_open

    path = export.export_gguf(project.db, checkpoint_id, tmp_path / "out", "f16")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "llama"
    template = json.loads((tiny_model_dir / "tokenizer_config.json").read_text()).get("chat_template") or (
        tiny_model_dir / "chat_template.jinja").read_text()
    assert reader.get_field("tokenizer.chat_template").contents() == template
    with safe_open(tiny_model_dir / "model.safetensors", framework="np") as source:
        shapes = {name: source.get_slice(name).get_shape() for name in source.keys()}
    shapes.pop("lm_head.weight", None)  # tied to the embeddings: llama.cpp reuses token_embd
    assert len(reader.tensors) == len(shapes)
    written = {t.name: list(reversed(t.shape.tolist())) for t in reader.tensors}  # GGUF lists dims inner first
    assert written["token_embd.weight"] == shapes["model.embed_tokens.weight"]
    assert written["blk.1.attn_k.weight"] == shapes["model.layers.1.self_attn.k_proj.weight"]
    assert written["blk.0.ffn_down.weight"] == shapes["model.layers.0.mlp.down_proj.weight"]
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32  # vectors stay f32


def test_gguf_loads_in_transformers_with_the_merged_models_logits(project, checkpoint_id, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(runs.export_merged(project.db, checkpoint_id, tmp_path / "m"))
    path = export.export_gguf(project.db, checkpoint_id, tmp_path / "g", "f32")
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ids = torch.tensor([[5, 17, 99, 140, 3, 61]])
    with torch.no_grad():
        expected, got = merged(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # q/k rows reordered and back


def test_gguf_takes_rope_settings_from_transformers_5_and_older_configs(tmp_path, tiny_model_dir):
    import shutil

    import gguf

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    for key, value, theta in (("rope_parameters", {"rope_theta": 12345.0, "rope_type": "default"}, 12345.0),
                              ("rope_theta", 54321.0, 54321.0)):
        config.pop("rope_parameters", None)
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        export.write_gguf(folder, tmp_path / "x.gguf", "f16", "x")
        assert gguf.GGUFReader(tmp_path / "x.gguf").get_field("llama.rope.freq_base").contents() == theta
    config["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(export.ExportError, match="'llama3' scaling"):
        export.write_gguf(folder, tmp_path / "y.gguf", "f16", "y")


def test_q8_0_stores_matrices_quantised(project, checkpoint_id, tmp_path):
    import gguf

    small = export.export_gguf(project.db, checkpoint_id, tmp_path / "q8", "q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(small).tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert small.name == "model-q8_0.gguf"


def test_an_unknown_quant_type_is_refused_before_anything_is_written(project, checkpoint_id, tmp_path):
    with pytest.raises(export.ExportError, match="q2_k"):
        export.export_gguf(project.db, checkpoint_id, tmp_path / "out", "q2_k")
    assert not (tmp_path / "out").exists()


def test_modelfile_carries_the_chatml_template_and_its_stop_tokens(project, checkpoint_id, tmp_path):
    export.export_gguf(project.db, checkpoint_id, tmp_path / "out", "f16")
    assert (tmp_path / "out" / "Modelfile").read_text() == (
        "FROM ./model-f16.gguf\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n'
        "{{ else }}<|im_start|>user\n{{ end }}{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
        '{{ .Response }}<|im_end|>\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n')


def test_every_export_carries_a_card_with_settings_data_metrics_and_verdict(project, checkpoint_id, tmp_path):
    cards = {
        "adapter": export.export_adapter(project.db, checkpoint_id, tmp_path / "a") / "README.md",
        "merged": export.export_merged(project.db, checkpoint_id, tmp_path / "m") / "README.md",
        "gguf": export.export_gguf(project.db, checkpoint_id, tmp_path / "g", "f16").parent / "README.md",
    }
    for kind, path in cards.items():
        card = path.read_text()
        front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
        assert f'library_name: "{export.LIBRARIES[kind]}"' in front
        assert "| max_steps | 2 |" in body
        assert "| pairs | preference | 2 |" in body
        assert "| labelled comparisons | preference (from the studio's labels) | 0 |" in body
        assert "Final metrics (step 2):" in body and "| loss |" in body
        assert "## Stage advisor at export time" in body
    # the hash is of the rows as stored: SHA-256 over each row's JSON-encoded values, one per line
    rows = [["\"Hi\"", "\"Hello!\"", "\"Go away.\""], ["\"2+2?\"", "\"4\"", "\"5\""]]
    digest = hashlib.sha256("".join(json.dumps(row) + "\n" for row in rows).encode()).hexdigest()
    assert f"`{digest}`" in cards["gguf"].read_text()


def test_the_card_says_why_when_the_advisor_fails(project, checkpoint_id, tmp_path, monkeypatch):
    from studio.core import advisor

    def broken(db, run_id=None):
        raise RuntimeError("advisor under repair")

    monkeypatch.setattr(advisor, "gather", broken)
    card = (export.export_adapter(project.db, checkpoint_id, tmp_path / "a") / "README.md").read_text()
    assert "(The advisor could not judge this run: RuntimeError: advisor under repair)" in card


def test_a_non_llama_model_is_refused_with_a_way_out(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(export.ExportError, match="'gpt2'.*convert_hf_to_gguf"):
        export.write_gguf(tmp_path, tmp_path / "x.gguf", "f16", "x")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.demo
def test_demo_gguf_answers_as_the_merged_model_does(tmp_path):
    """The demo model after a 1-step DPO run: greedy answers from the GGUF equal the merged model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.core.demo import ensure_demo_project

    project_path = ensure_demo_project(tmp_path / "demo")
    with store.Project.open(project_path) as project:
        few = store.add_dataset(project.db, "two pairs", "preference", [  # a short reference pass
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
        config = runs.make_config("dpo", {"max_steps": 1, "batch_size": 2, "dataset_ids": [few],
                                          "include_labels": False, "learning_rate": 1e-3,
                                          "eval_max_new_tokens": 2})
        run_id = runs.create_run(project.db, config)
        runs.execute(project.path, run_id)
        checkpoint = store.checkpoints(project.db, run_id)[-1]["id"]
        merged_dir = runs.export_merged(project.db, checkpoint, tmp_path / "merged")
        gguf_path = export.export_gguf(project.db, checkpoint, tmp_path / "gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    for question in ("What is the capital of France?", "Name three colours.", "Write a haiku about rain."):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        assert gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")["input_ids"].tolist() == ids.tolist()
        expected = merged.generate(ids, max_new_tokens=24, do_sample=False)
        got = reloaded.generate(ids, max_new_tokens=24, do_sample=False)
        assert got.tolist() == expected.tolist(), tokenizer.decode(expected[0, ids.shape[1]:])


def test_cli_exports_gguf_and_names_a_bad_quant_type(project, checkpoint_id, tmp_path, capsys):
    from studio.cli import main

    project.close()  # the CLI opens the project itself
    assert main(["export", str(project.path), str(tmp_path / "g"), "--gguf", str(checkpoint_id),
                 "--quant", "q8_0"]) == 0
    assert f"GGUF written to {tmp_path / 'g' / 'model-q8_0.gguf'}" in capsys.readouterr().out
    assert main(["export", str(project.path), str(tmp_path / "h"), "--gguf", str(checkpoint_id),
                 "--quant", "q4_k_m"]) == 2
    assert "Unknown GGUF type 'q4_k_m'; expected one of f16, q8_0, bf16, f32" in capsys.readouterr().err

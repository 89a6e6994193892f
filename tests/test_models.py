"""Model loading: local folders, clear errors, LoRA; the demo model in one slower test."""

import json
import shutil

import pytest

from studio.core.models import ModelLoadError, ModelSource, add_lora, inspect_model, load_model, resolve_folder


def copy_of(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_tiny_folder_loads_and_is_described(tiny_model_dir):
    model, tokenizer = load_model(ModelSource("folder", str(tiny_model_dir)))
    info = inspect_model(ModelSource("folder", str(tiny_model_dir)))
    assert info.architecture == "LlamaForCausalLM"
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.has_chat_template and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("breakage, message", [
    (lambda d: shutil.rmtree(d), "Model folder not found"),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer"),
    (lambda d: (d / "chat_template.jinja").unlink(), "no chat template"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pickle"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "resnet"})), "not a causal language model"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "auto_map": {"AutoModelForCausalLM": "evil.Model"}})),
     "config.json names custom code .auto_map.. Alignment Studio never runs"),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((d / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["evil.T", None]}})),
     "tokenizer_config.json names custom code"),
    # A decoy .safetensors beside pickle weights: transformers would load only the .bin.
    (lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin"),
                (d / "decoy.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")),
     "only pickle"),
])
def test_broken_folders_give_clear_errors(tiny_model_dir, tmp_path, breakage, message):
    folder = copy_of(tiny_model_dir, tmp_path)
    breakage(folder)
    with pytest.raises(ModelLoadError, match=message):
        resolve_folder(ModelSource("folder", str(folder)))


def test_base_identity_tells_a_retrained_base_from_the_same_one(tiny_model_dir, tmp_path):
    from studio.core.models import base_identity
    from studio.core.tiny import build_tiny_model_folder

    same = base_identity(ModelSource("folder", str(copy_of(tiny_model_dir, tmp_path))))
    assert same["hash"] == base_identity(ModelSource("folder", str(tiny_model_dir)))["hash"]
    retrained = build_tiny_model_folder(tmp_path / "retrained", seed=1)  # same shapes, other weights
    assert base_identity(ModelSource("folder", str(retrained)))["hash"] != same["hash"]


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_folder(ModelSource("gguf", str(tmp_path / "nope.gguf")))


def test_lora_starts_equal_to_the_base(tiny_model_dir):
    import torch

    model, _ = load_model(ModelSource("folder", str(tiny_model_dir)))
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits.detach().clone()
    policy = add_lora(model, r=4)
    assert torch.allclose(policy(ids).logits, before)  # LoRA B starts at zero
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.demo
def test_demo_model_answers_fluently():
    from studio.core.generation import Decoding, generate

    model, tokenizer = load_model(ModelSource("demo"))
    [answer] = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                        Decoding(max_new_tokens=20))
    assert "Paris" in answer.text and answer.finished


def test_two_threads_can_load_models_at_once(tiny_model_dir):
    """The compare view and a starting run load in parallel threads of one process."""
    from concurrent.futures import ThreadPoolExecutor

    source = ModelSource("folder", str(tiny_model_dir))
    with ThreadPoolExecutor(4) as pool:
        models = [future.result()[0] for future in [pool.submit(load_model, source) for _ in range(4)]]
    assert all(not any(p.is_meta for p in m.parameters()) for m in models)


@pytest.mark.demo
def test_converted_demo_folder_is_plain_safetensors_without_gguf_quantization():
    folder = resolve_folder(ModelSource("demo"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").exists() and (folder / "chat_template.jinja").exists()


def test_model_parameters_counts_the_projects_base_model(project, tiny_model_dir):
    from studio.core.models import model_parameters

    model, _ = load_model(ModelSource("folder", str(tiny_model_dir)))
    # Tied embeddings are stored once: count each tensor once, as the safetensors file holds them.
    expected = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model_parameters(project.db) == expected


def test_model_parameters_does_not_import_torch(project):
    """The window reads the size when a project opens, in its GUI thread: importing torch there
    froze the fresh window for seconds."""
    import subprocess
    import sys

    code = ("import sys; from studio.core import store; from studio.core.models import model_parameters; "
            f"db = store.connect({str(project.path)!r}); print(model_parameters(db)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 0 and out[1] == "False"

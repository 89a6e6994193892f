"""Scoring batches: the one-sequence-per-row layout and the shared-prompt layout, checked by hand and
against each sequence scored alone."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio.core.batches import collate, collate_shared, scored_logits, shared_prompts_match, unwrap

T, F = True, False


def test_one_row_per_sequence_masks_come_from_lengths_not_token_ids():
    pad = 5  # the same id as a real response token, as when pad == eos
    batch = collate([[1, 2], [1, 2]], [[3, 5], [5]], pad_id=pad)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5], [1, 2, 5, pad]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.rows.tolist() == [0, 0, 1] and batch.cols.tolist() == [1, 2, 1]
    assert batch.targets.tolist() == [3, 5, 5]  # responses only, their final (end-of-turn) token included
    assert batch.responses.tolist() == [0, 0, 1] and batch.offsets.tolist() == [0, 1, 0]
    assert batch.response_lengths.tolist() == [2, 1] and batch.num_tokens == 7


def test_a_shared_row_holds_the_prompt_once_and_each_response_sees_only_the_prompt_and_itself():
    pad = 5
    batch = collate_shared([([1, 2], [[3, 5], [5]]), ([7], [[8], [9, 5], [6, 4]])], pad_id=pad)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 5, pad], [7, 8, 9, 5, 6, 4]]
    assert batch.position_ids[0, :5].tolist() == [0, 1, 2, 3, 2]  # each response continues the prompt
    assert batch.position_ids[1].tolist() == [0, 1, 1, 2, 1, 2]
    assert batch.attention_mask[:, 0].tolist() == [
        [[T, F, F, F, F, F], [T, T, F, F, F, F], [T, T, T, F, F, F], [T, T, T, T, F, F], [T, T, F, F, T, F],
         [F, F, F, F, F, T]],  # padding sees itself only
        [[T, F, F, F, F, F], [T, T, F, F, F, F], [T, F, T, F, F, F], [T, F, T, T, F, F], [T, F, F, F, T, F],
         [T, F, F, F, T, T]]]
    scored = list(zip(batch.responses.tolist(), batch.offsets.tolist(), batch.rows.tolist(), batch.cols.tolist(),
                      batch.targets.tolist()))
    # (response, offset, row, predicting position, token): a response's first token is predicted by the
    # prompt's last position, the others by the position before them
    assert scored == [(0, 0, 0, 1, 3), (0, 1, 0, 2, 5), (1, 0, 0, 1, 5),
                      (2, 0, 1, 0, 8), (3, 0, 1, 0, 9), (3, 1, 1, 2, 5), (4, 0, 1, 0, 6), (4, 1, 1, 4, 4)]
    assert batch.response_lengths.tolist() == [2, 1, 1, 2, 2] and batch.num_tokens == 11


def logprobs_alone(model, prompt: list[int], response: list[int]) -> list[float]:
    """The reference computation: the sequence alone, unpadded, log p(token | everything before it)."""
    ids = prompt + response
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]


def token_logprobs(model, batch) -> list[float]:
    with torch.no_grad():
        return scored_logits(model, batch).log_softmax(-1).gather(1, batch.targets[:, None]).squeeze(1).tolist()


sequences = st.lists(st.integers(1, 60), min_size=1, max_size=6)
groups = st.lists(st.tuples(sequences, st.lists(sequences, min_size=1, max_size=4)), min_size=1, max_size=3)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=groups, pad=st.sampled_from([0, 7]))
def test_shared_rows_score_each_response_as_it_scores_alone(tiny_model, groups, pad):
    expected = [value for prompt, responses in groups for response in responses
                for value in logprobs_alone(tiny_model, prompt, response)]
    assert token_logprobs(tiny_model, collate_shared(groups, pad)) == pytest.approx(expected, abs=1e-5)
    alone = collate([prompt for prompt, responses in groups for _ in responses],
                    [response for _, responses in groups for response in responses], pad)
    assert token_logprobs(tiny_model, alone) == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from studio.core.models import ModelSource, load_model

    model, _ = load_model(ModelSource(kind="folder", path=str(tiny_model_dir)))
    return model.eval()


def test_the_model_takes_the_shared_layout_with_sdpa_and_with_eager_attention(tiny_model_dir):
    from studio.core.models import ModelSource, load_model

    model, _ = load_model(ModelSource(kind="folder", path=str(tiny_model_dir)))
    assert shared_prompts_match(model, max_length=1024)
    unwrap(model).set_attn_implementation("eager")  # adds the mask to the scores instead of taking booleans
    assert shared_prompts_match(model, max_length=1024)


def test_not_under_a_sliding_window_shorter_than_max_length():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=256)
    model = MistralForCausalLM(config)
    assert shared_prompts_match(model, max_length=256)
    assert not shared_prompts_match(model, max_length=257)


def test_not_where_attention_ignores_the_custom_mask(tiny_model_dir):
    from transformers import AttentionInterface

    from studio.core.models import ModelSource, load_model

    def causal_only(module, query, key, value, attention_mask, **kwargs):  # drops the mask: every row causal
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, None, **kwargs)

    AttentionInterface.register("causal_only", causal_only)
    model, _ = load_model(ModelSource(kind="folder", path=str(tiny_model_dir)))
    unwrap(model).set_attn_implementation("causal_only")
    assert not shared_prompts_match(model, max_length=1024)

"""Split sampling for data-parallel shaping runs, in one process: the share each rank takes, rows
seeded independently of their neighbours, and the gathered batch equal to the one-process batch
(ranks simulated by patching `distributed`; the real 2-process runs are in test_distributed.py)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from studio.core import distributed, ppo
from tests.shaping_runs import add_prompts
from tests.test_ppo import make_engine


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(0, 12), group_size=st.integers(1, 4), world=st.integers(1, 5))
def test_ranks_share_the_rows_in_whole_groups_each_row_once(groups, group_size, world):
    shares = []
    for rank in range(world):
        with pytest.MonkeyPatch.context() as monkeypatch:
            as_rank(monkeypatch, rank, world)
            shares.append(distributed.shard_groups(groups * group_size, group_size))
    assert sorted(row for share in shares for row in share) == list(range(groups * group_size))
    for share in shares:
        assert all(row // group_size == share[start] // group_size
                   for start in range(0, len(share), group_size) for row in share[start:start + group_size])
    assert max(map(len, shares)) - min(map(len, shares)) <= group_size  # balanced to within a group


def test_a_rows_response_depends_on_its_seed_not_on_the_rows_beside_it(project):
    add_prompts(project)
    engine = make_engine(project, temperature=1.0, max_new_tokens=8)
    prompts = ["Q1:", "A longer question, padded less:", "Q3:"]
    seeds = [ppo.rollout_seed(0, step=4, row=row) for row in range(3)]
    together = engine.generate(prompts, seeds)
    alone = engine.generate(prompts[1:2], seeds[1:2])
    reordered = engine.generate(prompts[::-1], seeds[::-1])
    assert alone[0].response_ids == together[1].response_ids == reordered[1].response_ids
    assert together[2].response_ids == reordered[0].response_ids
    other_seed = engine.generate(prompts[1:2], [ppo.rollout_seed(0, step=5, row=1)])
    assert other_seed[0].response_ids != alone[0].response_ids  # the seed is what fixes the sample


def test_two_simulated_ranks_gather_the_one_process_batch(project, monkeypatch):
    """Each simulated rank samples and scores its groups; the merged batch is the one-process one."""
    add_prompts(project)
    engine = make_engine(project, temperature=1.0, max_new_tokens=6)
    prompts = [f"Q{i // 2}:" for i in range(10)]  # 5 prompts x 2 completions
    seeds = [ppo.rollout_seed(3, 0, row) for row in range(10)]

    def step_sample():
        return ppo.sample_and_score(prompts, seeds, 2, engine.generate, engine.reward_function,
                                    engine.tokenizer.pad_token_id, "cpu")

    whole = step_sample()
    sent = []

    def stop_after_sending(value):
        sent.append(value)
        raise InterruptedError  # this simulated rank has sampled and scored its share

    monkeypatch.setattr(distributed, "all_gather_object", stop_after_sending)
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        with pytest.raises(InterruptedError):
            step_sample()
    assert [indices for indices, _ in sent] == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]
    monkeypatch.setattr(distributed, "all_gather_object", lambda value: sent)
    merged = step_sample()

    assert merged.most_per_process == 6 and whole.most_per_process == 10
    assert torch.equal(merged.rollout.input_ids, whole.rollout.input_ids)
    assert torch.equal(merged.rollout.attention_mask, whole.rollout.attention_mask)
    assert merged.rollout.texts == whole.rollout.texts and merged.rollout.context_length == whole.rollout.context_length
    assert torch.equal(merged.rewards, whole.rewards)
    assert merged.breakdown.keys() == whole.breakdown.keys()
    assert all(torch.equal(merged.breakdown[name], whole.breakdown[name]) for name in whole.breakdown)
    assert len(set(whole.rollout.texts)) > 1  # real, differing samples

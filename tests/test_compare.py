"""The compare view's core: stored outputs, seeded streaming generation, figures, word differences."""

import pytest

from studio.core import compare, runs, store

PROMPT = [{"role": "user", "content": "Tell me a story."}]
SAMPLED = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A project with a toy run of two checkpoints (greedy samples of 4 eval prompts at each)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(runs.ENGINE_MODULES, "toy", "tests.toy_engine")
        project = store.Project.create(tmp_path_factory.mktemp("compare") / "project",
                                       base_model={"kind": "folder", "path": str(tiny_model_dir)})
        store.add_dataset(project.db, "eval", "prompts", [
            {"prompt": [{"role": "user", "content": text}]} for text in ("Say hi.", "Name a colour.")],
            is_eval=True)
        config = runs.make_config("toy", {"max_steps": 2, "checkpoint_every": 1, "eval_max_new_tokens": 6})
        runs.execute(project.path, runs.create_run(project.db, config))
        yield project
        project.close()


@pytest.fixture(scope="module")
def cache():
    return compare.ModelCache(capacity=3, device="cpu")


# --- word differences -------------------------------------------------------------------------

def rebuilt(pieces, side):
    skip = "insert" if side == "a" else "delete"
    return "".join(text for op, text in pieces if op != skip)


@pytest.mark.parametrize("a, b, expected", [
    ("same words here", "same words here", [("equal", "same words here")]),
    ("the red cat sat.", "the blue dog sat.",
     [("equal", "the "), ("delete", "red cat"), ("insert", "blue dog"), ("equal", " sat.")]),
    ("Paris.", "Paris. It is lovely.", [("equal", "Paris."), ("insert", " It is lovely.")]),
    ("Sure! The answer is 4.", "The answer is 4.", [("delete", "Sure! "), ("equal", "The answer is 4.")]),
    ("", "new", [("insert", "new")]),
    ("one\ntwo", "one\nthree", [("equal", "one\n"), ("delete", "two"), ("insert", "three")]),
])
def test_word_diff_hand_cases(a, b, expected):
    pieces = compare.word_diff(a, b)
    assert pieces == expected
    assert rebuilt(pieces, "a") == a and rebuilt(pieces, "b") == b


def test_word_diff_keeps_whitespace_exactly():
    a, b = "  Indented  start,\n\nthen  more text ", "  Indented start,\n\nthen more  text"
    pieces = compare.word_diff(a, b)
    assert rebuilt(pieces, "a") == a and rebuilt(pieces, "b") == b


# --- stored outputs ---------------------------------------------------------------------------

def test_stored_outputs_for_checkpoints_and_base(trained):
    db = trained.db
    prompt_ids = [p["id"] for p in store.eval_prompts(db)]
    first, second = (s.state for s in compare.model_states(db)[1:])
    greedy = compare.stored_decoding(db)
    assert greedy["max_new_tokens"] == 6 and greedy["temperature"] == 0
    for checkpoint_id in (first, second):
        outputs = compare.stored_outputs(db, checkpoint_id, prompt_ids, greedy)
        expected = {row["prompt_id"]: row["text"] for row in store.samples(db, checkpoint_id)}
        assert {pid: o.text for pid, o in outputs.items()} == expected and len(expected) == 2
        assert all(o.stored and o.figures["tokens"] > 0 for o in outputs.values())

    # The run started from the base: its first checkpoint stored the base's greedy answers too.
    base = compare.stored_outputs(db, None, prompt_ids, greedy)
    assert {pid: o.text for pid, o in base.items()} == {r["prompt_id"]: r["text"] for r in store.samples(db, None)}
    assert len(base) == 2
    db.execute("DELETE FROM samples WHERE checkpoint_id IS NULL")
    db.conn.commit()
    assert compare.stored_outputs(db, None, prompt_ids, greedy) == {}
    store.add_samples(db, [{"checkpoint_id": None, "prompt_id": prompt_ids[0], "sample_index": 0, "seed": 0,
                            "decoding": greedy, "text": "Hi there.", "scores": {"length": 4, "finished": True}}])
    base = compare.stored_outputs(db, None, prompt_ids, greedy)
    assert base[prompt_ids[0]].text == "Hi there." and base[prompt_ids[0]].figures == {"tokens": 4, "words": 2}

    # Greedy ignores the seed; another length or a sampled decoding is not what was stored.
    assert compare.stored_outputs(db, first, prompt_ids, {**greedy, "seed": 9}).keys() == set(prompt_ids)
    assert compare.stored_outputs(db, first, prompt_ids, {**greedy, "max_new_tokens": 7}) == {}
    assert compare.stored_outputs(db, first, prompt_ids, {**greedy, "temperature": 0.7}) == {}
    assert compare.stored_outputs(db, first, prompt_ids[:1]).keys() == {prompt_ids[0]}


def test_model_states_are_labelled_by_run_and_step(trained):
    labels = [s.label for s in compare.model_states(trained.db)]
    assert labels == ["Base model", "TOY #1, checkpoint 1 (step 1)", "TOY #1, checkpoint 2 (step 2)"]


# --- generation -------------------------------------------------------------------------------

def test_generation_is_seeded_and_streams_the_full_text(trained, cache):
    states = [None, compare.model_states(trained.db)[-1].state]
    streamed = {0: [], 1: []}
    first = compare.generate_outputs(cache, trained.db, states, PROMPT, SAMPLED,
                                     on_text=lambda index, text: streamed[index].append(text))
    again = compare.generate_outputs(cache, trained.db, states, PROMPT, SAMPLED)
    assert [o.text for o in first] == [o.text for o in again]
    assert [o.response_ids for o in first] == [o.response_ids for o in again]
    other_seed = compare.generate_outputs(cache, trained.db, states[:1], PROMPT, {**SAMPLED, "seed": 4})
    assert other_seed[0].response_ids != first[0].response_ids

    for index, output in enumerate(first):
        texts = streamed[index]
        assert len(texts) > 2 and texts[-1] == output.text  # token by token, ending on the full text
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
        assert output.figures["tokens"] == len(output.response_ids) <= SAMPLED["max_new_tokens"]


def test_greedy_generation_reproduces_the_stored_sample(trained, cache):
    prompt = store.eval_prompts(trained.db)[0]
    checkpoint = compare.model_states(trained.db)[-1].state
    stored = compare.stored_outputs(trained.db, checkpoint, [prompt["id"]])[prompt["id"]]
    fresh = compare.generate_outputs(cache, trained.db, [checkpoint], prompt["prompt"],
                                     compare.stored_decoding(trained.db))
    assert fresh[0].text == stored.text


def test_cancel_stops_generation_early(trained, cache):
    import threading

    cancel = threading.Event()
    cancel.set()
    assert compare.generate_outputs(cache, trained.db, [None], PROMPT, SAMPLED, cancel=cancel) == []


# --- figures ----------------------------------------------------------------------------------

def test_logprob_under_base_equals_a_hand_loop_over_tokens(trained, cache):
    import torch

    from studio.core.generation import encode_prompt

    model, tokenizer = cache.get(trained.db, None)
    response = tokenizer("Blue, mostly.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total, mean = compare.base_logprob(model, tokenizer, PROMPT, response)

    context = encode_prompt(tokenizer, PROMPT)
    expected = 0.0
    with torch.no_grad():
        for token in response:
            logits = model(input_ids=torch.tensor([context])).logits[0, -1]
            expected += torch.log_softmax(logits, dim=-1)[token].item()
            context = context + [token]
    assert total == pytest.approx(expected, abs=1e-4)
    assert mean == pytest.approx(expected / len(response), abs=1e-5)


def test_score_outputs_adds_reward_and_logprob(trained, cache):
    outputs = [compare.Output("Certainly! Blue.", finished=True, stored=True,
                              figures=compare.length_figures("Certainly! Blue.", 17)),
               compare.Output("")]
    scored = compare.score_outputs(cache, trained.db, PROMPT, outputs)
    assert "reward" not in outputs[0].figures  # copies: the inputs are left as they were
    filler = scored[0].figures
    assert filler["reward/no_filler"] == -1.0  # the demo preset: "Certainly!" is filler
    assert filler["reward/finished"] == 1.0  # ends with a full stop
    assert filler["reward"] == pytest.approx(filler["reward/no_filler"] + filler["reward/concise"] + 1.0)
    assert filler["logprob_sum"] < 0 and filler["logprob_mean"] == pytest.approx(filler["logprob_sum"] / 17)
    assert "logprob_sum" not in scored[1].figures  # nothing to score


# --- the model cache --------------------------------------------------------------------------

def test_model_cache_evicts_the_least_recently_used_state():
    loads = []

    def loader(db, state, device):
        loads.append(state)
        return f"model {state}", "tokenizer"

    cache = compare.ModelCache(capacity=2, loader=loader)
    assert cache.get(None, None) == ("model None", "tokenizer")
    cache.get(None, 1)
    cache.get(None, None)  # the base is now the most recently used
    cache.get(None, 2)  # evicts 1
    assert cache.loaded() == [None, 2]
    cache.get(None, 1)  # loaded again, evicts the base
    assert loads == [None, 1, 2, 1] and cache.loaded() == [2, 1]


def info(state, method):
    return compare.StateInfo(state, f"{method} checkpoint {state}", run_id=state * 10, method=method, step=state)


@pytest.mark.parametrize("states, expected", [
    ([info(1, "ppo"), info(2, "ppo"), info(3, "dpo")], [2, 3]),
    ([info(1, "grpo"), info(2, "dpo"), info(3, "dpo")], [1, 3]),
    ([info(1, "dpo"), info(2, "rloo"), info(3, "rloo")], [3, 1]),
    ([info(1, "ppo"), info(2, "grpo"), info(3, "dpo")], [2, 3]),  # the latest shaping checkpoint, whatever its method
    ([info(1, "grpo"), info(2, "grpo")], [None, 2]),  # no DPO: the base next to the latest
    ([], [None, None]),
])
def test_the_view_opens_on_the_latest_shaping_checkpoint_next_to_the_latest_dpo_one(states, expected):
    assert compare.default_states([compare.StateInfo(None, "Base model"), *states]) == expected

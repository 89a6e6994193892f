"""Reward sources: every rule on hand-made texts, weights, normalisation, and both kinds of reward model."""

import random

import pytest
import torch

from studio.core import labelling, rewards, store
from studio.core.cpu_linears import onednn_available


def score(source: dict, text: str, tokenizer=None) -> float:
    return rewards.source_from_json(source).score(text, tokenizer)


# --- rules ------------------------------------------------------------------------------------

def test_length_band_in_words_is_one_inside_and_falls_linearly_outside():
    band = {"type": "length_band", "min": 3, "max": 5, "falloff": 4}
    assert score(band, "one two three") == 1.0
    assert score(band, "one two three four five") == 1.0
    assert score(band, "one") == 0.5  # 2 words short of 3, falloff 4
    assert score(band, "a b c d e f g") == 0.5  # 2 words over 5
    assert score(band, "a b c d e f g h i j") == 0.0  # 5 over: floored at 0
    assert score(band, "don't stop") == 0.75  # two words ("don't" is one): 1 short


def test_length_band_in_tokens_counts_with_the_tokenizer():
    from studio.core.tiny import build_tokenizer

    band = {"type": "length_band", "min": 1, "max": 4, "unit": "tokens", "falloff": 2}
    tokenizer = build_tokenizer()  # byte-level: one token per ASCII character
    assert score(band, "abcd", tokenizer) == 1.0
    assert score(band, "abcde", tokenizer) == 0.5


def test_required_words_scores_the_share_found_as_whole_words():
    rule = {"type": "required_words", "words": ["thank you", "please"]}
    assert score(rule, "Thank you, and PLEASE sit.") == 1.0
    assert score(rule, "please sit") == 0.5
    assert score(rule, "pleased to meet you") == 0.0  # not a whole-word match
    assert score({**rule, "case_insensitive": False}, "Please, thank you") == 0.5


def test_forbidden_words_costs_one_per_occurrence():
    rule = {"type": "forbidden_words", "words": ["Great question!", "basically"]}
    assert score(rule, "The sun is a star.") == 0.0
    assert score(rule, "great question! It is basically, basically hot.") == -3.0
    assert score({**rule, "case_insensitive": False}, "great question! Basically.") == 0.0


def test_regex_requires_a_match_or_penalises_each_match():
    assert score({"type": "regex", "pattern": r"\d+ (km|miles)"}, "About 384400 KM away.") == 1.0
    assert score({"type": "regex", "pattern": r"\d+ (km|miles)", "case_insensitive": False}, "384400 KM") == 0.0
    assert score({"type": "regex", "pattern": r"!", "forbid": True}, "Wow! Great! Yes.") == -2.0


def test_format_checks():
    ends = {"type": "terminal_punctuation"}
    assert score(ends, "It is blue.") == 1.0
    assert score(ends, 'He said "stop!"  ') == 1.0  # a closing quote after the punctuation
    assert score(ends, "It is blue") == 0.0
    assert score(ends, "") == 0.0
    lists = {"type": "no_markdown_lists"}
    assert score(lists, "First, mix. Then - gently - stir.") == 1.0
    assert score(lists, "Steps:\n- mix\n- stir") == 0.0
    assert score(lists, "1. mix\n2. stir") == 0.0
    assert score(lists, "## Heading\ntext") == 0.0
    lines = {"type": "max_lines", "max_lines": 2}
    assert score(lines, "one\n\ntwo\n") == 1.0  # blank lines do not count
    assert score(lines, "one\ntwo\nthree") == 0.0


def test_repetition_penalises_the_share_of_repeated_ngrams():
    rule = {"type": "repetition", "n": 2}
    assert score(rule, "the cat sat on the mat") == 0.0
    # bigrams: (a b) (b a) (a b) (b a): 2 of 4 repeat an earlier one
    assert score(rule, "a b a b a") == -0.5
    assert score(rule, "single") == 0.0  # no bigram at all


# --- sources, weights, catalogue --------------------------------------------------------------

def test_weights_combine_and_each_source_keeps_its_own_score():
    reward = rewards.RewardFunction([
        {"type": "length_band", "min": 1, "max": 3, "weight": 2.0},
        {"type": "forbidden_words", "words": ["sorry"], "weight": 0.5},
        {"type": "forbidden_words", "words": ["um"], "weight": 1.0, "name": "no_um"},
    ])
    total, breakdown = reward([None, None], ["Sorry, um, sorry.", "Fine."])
    assert list(breakdown) == ["length_band", "forbidden_words", "no_um"]
    assert breakdown["forbidden_words"].tolist() == [-2.0, 0.0]
    assert breakdown["no_um"].tolist() == [-1.0, 0.0]
    assert total.tolist() == [2 * 1.0 + 0.5 * -2 + -1.0, 2.0]


def test_sources_round_trip_through_json_and_the_catalogue_lists_every_type():
    catalogue = rewards.describe_sources()
    assert set(catalogue) == set(rewards.SOURCE_TYPES)
    band = catalogue["length_band"]
    assert band["help"] and band["params"]["unit"] == {"default": "words", "help": "What is counted",
                                                       "choices": ("words", "tokens")}
    assert "weight" not in band["params"]
    for kind, entry in catalogue.items():  # the defaults the UI shows build the same source
        defaults = {name: p["default"] for name, p in entry["params"].items()}
        source = rewards.source_from_json({"type": kind, **defaults})
        assert rewards.source_from_json(source.to_json()) == source


def test_check_sources_explains_what_is_wrong(tmp_path):
    assert rewards.check_sources(rewards.demo_preset(), tmp_path) == []
    assert "no reward sources" in rewards.check_sources([], tmp_path)[0]
    problems = rewards.check_sources([
        {"type": "length_band", "min": 9, "max": 2},
        {"type": "regex", "pattern": "("},
        {"type": "sentiment"},
        {"type": "forbidden_words", "words": ["x"], "colour": "red"},
        {"type": "reward_model", "path": str(tmp_path / "missing")},
        {"type": "trained_reward_model", "model": "nope"},
        {"type": "trained_reward_model", "model": "../elsewhere"},
    ], tmp_path)
    assert len(problems) == 7
    for expected, problem in zip(("min <= max", "not a valid regular expression", "Unknown reward source type",
                                  "unknown parameter(s) colour", "folder not found", "no reward model named 'nope'",
                                  "not a reward model name"),
                                 problems):
        assert expected in problem


def test_demo_preset_prefers_concise_finished_answers_without_filler():
    reward = rewards.RewardFunction(rewards.demo_preset())
    direct = "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue from every direction."
    padded = "Certainly! Great question! " + direct + " I hope this helps! Let me know if you have any other questions."
    cut_off = direct.rsplit(" ", 3)[0]  # ran out of tokens mid-sentence
    total, breakdown = reward([None] * 3, [direct, padded, cut_off])
    assert breakdown["no_filler"].tolist() == [0.0, -4.0, 0.0]
    assert breakdown["finished"].tolist() == [1.0, 1.0, 0.0]
    assert total[0] > total[1] and total[0] > total[2]


def test_normalizer_uses_running_statistics_then_clips():
    normalizer = rewards.RewardNormalizer(normalize=True, clip=1.5)
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 0.0])
    normalizer(first)
    out = normalizer(second)
    seen = torch.cat([first, second]).double()
    assert normalizer.mean.item() == pytest.approx(seen.mean().item())
    assert normalizer.std.item() == pytest.approx(seen.std(unbiased=False).item())
    expected = ((second - seen.mean()) / seen.std(unbiased=False)).clamp(-1.5, 1.5)
    assert torch.allclose(out, expected.float())

    restored = rewards.RewardNormalizer(normalize=True, clip=1.5)
    restored.load_state_dict(normalizer.state_dict())
    assert torch.equal(restored(torch.tensor([4.0])), normalizer(torch.tensor([4.0])))
    assert rewards.RewardNormalizer(clip=0.5)(torch.tensor([-2.0, 0.25])).tolist() == [-0.5, 0.25]


# --- reward models ----------------------------------------------------------------------------

def test_sequence_classification_folder_loads_and_scores(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from studio.core.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(tmp_path / "rm", safe_serialization=True)
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "rm")
    source = {"type": "reward_model", "path": str(tmp_path / "rm"), "batch_size": 2}
    assert rewards.check_sources([source], None) == []

    prompts = [[{"role": "user", "content": "Hi?"}]] * 3
    responses = ["Hello.", "Hello there, friend.", "Hi"]
    total, breakdown = rewards.RewardFunction([source])(prompts, responses)
    # The same as the model itself on each text alone (batched, padded scoring changes nothing).
    tokenizer = load_tokenizer(tiny_model_dir)
    for text, value in zip(responses, breakdown["reward_model"]):
        ids = tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": text}],
                                            tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        assert value.item() == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)

    # It only scores: frozen, so its linear layers take oneDNN's products where there is oneDNN.
    scorer = rewards.load_reward_model_folder(tmp_path / "rm")
    assert not any(p.requires_grad for p in scorer.model.parameters())
    if onednn_available():
        assert "forward" in scorer.model.model.layers[0].mlp.down_proj.__dict__

    not_a_classifier = rewards.check_sources([{"type": "reward_model", "path": str(tiny_model_dir)}], None)
    assert "not a sequence-classification model" in not_a_classifier[0]


def planted_pairs(count: int, seed: int = 0) -> list[dict]:
    """Chosen answers are lower-case words, rejected ones upper-case: a preference a tiny model can learn."""
    rng = random.Random(seed)

    def answer(letters: str) -> str:
        return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(3, 6)))

    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": answer("abcdefghijklmnopqrstuvwxyz")}],
             "rejected": [{"role": "assistant", "content": answer("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}]}
            for i in range(count)]


def test_reward_model_trained_from_labels_learns_a_planted_preference(project):
    store.add_dataset(project.db, "planted", "preference", planted_pairs(48))
    comparisons = labelling.compare_pairs(project.db, store.pairs(project.db), blind_seed=0)
    for comparison_id in comparisons:  # the annotator always picks the lower-case ("chosen") side
        comparison = labelling.get_comparison(project.db, comparison_id)
        labelling.record_label(project.db, comparison_id, "ann", "a" if comparison["source_a"]["side"] == "chosen" else "b")

    settings = rewards.RewardModelTraining(name="planted", epochs=3, learning_rate=1e-2, device="cpu")
    report = rewards.train_reward_model(project.path, settings)
    assert (report["train_pairs"], report["heldout_pairs"]) == (38, 10)
    assert report["heldout_accuracy"] >= 0.9  # chance is 0.5

    assert rewards.trained_reward_models(project.path) == ["planted"]
    source = {"type": "trained_reward_model", "model": "planted"}
    assert rewards.check_sources([source], project.path) == []
    held_out = planted_pairs(8, seed=1)
    _, breakdown = rewards.RewardFunction([source], project_path=project.path)(
        [p["prompt"] for p in held_out] * 2,
        [p["chosen"][0]["content"] for p in held_out] + [p["rejected"][0]["content"] for p in held_out])
    chosen, rejected = breakdown["trained_reward_model"].chunk(2)
    assert (chosen > rejected).float().mean() >= 0.75  # loaded back from the project, on new pairs


def test_training_a_reward_model_needs_pairs(project):
    with pytest.raises(rewards.RewardError, match="at least 2 preference pairs"):
        rewards.train_reward_model(project.path, rewards.RewardModelTraining())
    with pytest.raises(rewards.RewardError, match="use letters"):
        rewards.train_reward_model(project.path, rewards.RewardModelTraining(name="../escape"))


def test_reward_model_names_refuse_a_trailing_newline():
    from studio.core.rewards import SAFE_NAME

    assert SAFE_NAME.match("rm-1") and not SAFE_NAME.match("rm-1\n")

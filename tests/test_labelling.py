"""Preference labelling: blind sides, label and undo history, agreement, rankings, data out."""

import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from studio.core import datasets, labelling, runs, store
from studio.core.generation import Decoding


@pytest.fixture(autouse=True)
def toy_engine(monkeypatch):
    monkeypatch.setitem(runs.ENGINE_MODULES, "toy", "tests.toy_engine")


def add_pairs(db, count, name="imported"):
    """`count` imported pairs, and a comparison for each (chosen/rejected blinded)."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(count)]
    dataset_id = store.add_dataset(db, name, "preference", rows)
    return labelling.compare_pairs(db, store.pairs(db, [dataset_id]), blind_seed=7)


def toy_checkpoint(project):
    config = runs.make_config("toy", {"max_steps": 2, "checkpoint_every": 2, "eval_max_new_tokens": 2})
    run_id = runs.create_run(project.db, config)
    runs.execute(project.path, run_id)
    return store.checkpoints(project.db, run_id)[-1]["id"]


def fake_state_comparisons(db, records):
    """Comparisons between model states without generating: records are (state A, state B)."""
    ids = []
    for state_a, state_b in records:
        sources = [json.dumps({"kind": "model", "state": s, "name": str(s)}) for s in (state_a, state_b)]
        ids.append(db["comparisons"].insert({"prompt": '"q"', "response_a": "x", "response_b": "y",
                                             "source_a": sources[0], "source_b": sources[1],
                                             "created_at": time.time()}).last_pk)
    return ids


# --- blind, balanced sides --------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 2, 7, 20])
def test_swaps_are_balanced_and_seeded(count):
    swaps = labelling.balanced_swaps(count, seed=3)
    assert abs(swaps.count(True) - swaps.count(False)) <= 1
    assert swaps == labelling.balanced_swaps(count, seed=3)


def test_model_comparisons_are_balanced_blind_and_carry_provenance(project):
    checkpoint_id = toy_checkpoint(project)
    prompts = labelling.prompt_rows(project.db, "eval")
    ids = list(labelling.compare_states(project.db, "base", checkpoint_id, prompts,
                                        Decoding(max_new_tokens=3), blind_seed=1))
    comparisons = [labelling.get_comparison(project.db, cid) for cid in ids]
    on_a = Counter(c["source_a"]["state"] for c in comparisons)
    assert on_a["base"] == on_a[checkpoint_id] == 2  # 4 prompts: each state twice on each side
    checkpoint_side = next(s for c in comparisons for s in (c["source_a"], c["source_b"]) if s["state"] != "base")
    assert checkpoint_side["name"] == labelling.describe_state(project.db, checkpoint_id) == "TOY #1, checkpoint 1 (step 2)"  # its only checkpoint
    assert checkpoint_side["run_id"] == 1 and checkpoint_side["step"] == 2 and checkpoint_side["seed"] == 0
    assert checkpoint_side["decoding"]["max_new_tokens"] == 3
    assert {c["source"] for c in comparisons} == {"TOY #1, checkpoint 1 (step 2) vs base"}
    assert [c["prompt_id"] for c in comparisons] == [p["id"] for p in prompts]


def test_two_samples_of_one_state_are_reproducible_and_need_sampling(project):
    prompts = labelling.prompt_rows(project.db, "eval", limit=2)
    with pytest.raises(ValueError, match="temperature"):
        labelling.compare_samples(project.db, "base", prompts, Decoding(max_new_tokens=3))
    decoding = Decoding(max_new_tokens=6, temperature=1.0)
    first = [labelling.get_comparison(project.db, cid)
             for cid in labelling.compare_samples(project.db, "base", prompts, decoding, blind_seed=2)]
    again = [labelling.get_comparison(project.db, cid)
             for cid in labelling.compare_samples(project.db, "base", prompts, decoding, blind_seed=2)]
    assert [(c["response_a"], c["response_b"]) for c in first] == [(c["response_a"], c["response_b"]) for c in again]
    assert {c["source_a"]["seed"] for c in first} | {c["source_b"]["seed"] for c in first} == {1, 2}
    assert first[0]["source"] == "base: two samples"


# --- labels and undo --------------------------------------------------------------------------

def test_undo_is_a_new_row_and_labelled_pairs_follow_undo_and_edits(project):
    db = project.db
    first, second = add_pairs(db, 2)
    a_label = labelling.record_label(db, first, "ann", "a")
    edited = labelling.record_label(db, second, "ann", "b", edited_text="An improved answer.")
    undo = labelling.record_label(db, second, "ann", "undo")

    history = labelling.label_history(db)
    assert [(h["id"], h["choice"], h["undoes_label_id"]) for h in history] == [
        (a_label, "a", None), (edited, "b", None), (undo, "undo", edited)]
    assert [p["comparison_id"] for p in store.labelled_pairs(db)] == [first]

    relabel = labelling.record_label(db, second, "ann", "a", edited_text="An improved answer.")
    by_comparison = {p["comparison_id"]: p for p in store.labelled_pairs(db)}
    assert by_comparison[second]["chosen"] == "An improved answer." and by_comparison[second]["label_id"] == relabel
    assert len(labelling.label_history(db)) == 4  # history is never deleted


def test_bad_labels_are_refused(project):
    (cid,) = add_pairs(project.db, 1)
    with pytest.raises(ValueError, match="choice"):
        labelling.record_label(project.db, cid, "ann", "maybe")
    with pytest.raises(ValueError, match="annotator"):
        labelling.record_label(project.db, cid, "  ", "a")
    with pytest.raises(ValueError, match="edited"):
        labelling.record_label(project.db, cid, "ann", "tie", edited_text="x")
    with pytest.raises(ValueError, match="no label to undo"):
        labelling.record_label(project.db, cid, "ann", "undo")


def test_session_labels_undoes_and_resumes_where_the_labels_stop(project):
    ids = add_pairs(project.db, 3)
    session = labelling.LabellingSession(project.db, "ann", ids)
    assert session.next_item()["id"] == ids[0]
    session.label("a")
    session.label("tie")
    assert session.progress() == {"done": 2, "total": 3,
                                  "by_source": {"pairs: imported": {"done": 2, "total": 3}}}
    assert session.undo() == ids[1]
    assert session.next_item()["id"] == ids[1] and session.position == 1
    session.label("skip")

    reopened = labelling.LabellingSession(project.db, "ann", ids)
    assert reopened.next_item()["id"] == ids[2] and reopened.undo() is None
    reopened.label("b")
    assert reopened.next_item() is None and reopened.progress()["done"] == 3
    assert labelling.LabellingSession(project.db, "other", ids).position == 0


# --- several annotators -----------------------------------------------------------------------

def test_agreement_and_kappa_on_a_hand_case(project):
    ids = add_pairs(project.db, 5)
    for cid, x, y in zip(ids, ["a", "a", "b", "tie", "skip"], ["a", "b", "b", "tie", "a"]):
        labelling.record_label(project.db, cid, "ann", x)
        labelling.record_label(project.db, cid, "bob", y)
    result = labelling.agreement(project.db)
    # Shared judgements (the skip is not one): ann a a b tie, bob a b b tie -> 3 of 4 agree.
    # Chance: (2*1 + 1*2 + 1*1) / 16 = 5/16, so kappa = (3/4 - 5/16) / (11/16) = 7/11.
    assert result["shared"] == 4 and result["percent_agreement"] == 75
    (pair,) = result["pairs"]
    assert pair["annotators"] == ("ann", "bob") and pair["kappa"] == pytest.approx(7 / 11)
    assert result["annotators"]["ann"]["labels"] == 5 and result["annotators"]["ann"]["skip"] == 1
    assert labelling.cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement is total


# --- rankings ---------------------------------------------------------------------------------

def test_bradley_terry_three_wins_to_one_is_a_strength_ratio_of_three():
    scores, errors = labelling.bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), prior=0)
    assert math.exp(scores[0] - scores[1]) == pytest.approx(3)
    # Fisher information of d = s0 - s1 is n p (1 - p) = 4 * 3/4 * 1/4; each score carries half of d.
    assert errors[0] == pytest.approx(0.5 / math.sqrt(0.75))
    shrunk, _ = labelling.bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]))
    assert 2.5 < math.exp(shrunk[0] - shrunk[1]) < 3


def test_bradley_terry_errors_shrink_with_games_and_ignore_the_unidentified_offset():
    few = labelling.bradley_terry(np.array([[0, 2, 2], [1, 0, 2], [1, 1, 0]], dtype=float))[1]
    many = labelling.bradley_terry(10 * np.array([[0, 2, 2], [1, 0, 2], [1, 1, 0]], dtype=float))[1]
    assert np.all(many < few) and np.all(many < 0.4)


def test_bradley_terry_stays_finite_when_one_side_won_everything():
    scores, errors = labelling.bradley_terry(np.array([[0.0, 2.0], [0.0, 0.0]]))
    assert np.all(np.isfinite(scores)) and np.all(np.isfinite(errors)) and scores[0] > scores[1]


def test_elo_after_one_win_between_equals():
    ratings = labelling.elo_ratings(["x", "y"], [("x", "y", 1.0)])
    assert ratings == {"x": 1016, "y": 984}


def test_rankings_from_labels(project):
    db = project.db
    run_id = store.create_run(db, "ppo", {}, name="PPO #1")
    checkpoint_id = store.add_checkpoint(db, run_id, 50, "/nowhere")
    ids = fake_state_comparisons(db, [("base", checkpoint_id), (checkpoint_id, "base"),
                                      ("base", checkpoint_id), (checkpoint_id, "base"), ("base", "base")])
    for cid, choice in zip(ids, ["b", "a", "tie", "b", "a"]):  # checkpoint wins, wins, ties, loses
        labelling.record_label(db, cid, "ann", choice)
    labelling.record_label(db, ids[0], "bob", "both_bad")  # says nothing about the order
    rows = {row["name"]: row for row in labelling.rankings(db)}
    assert set(rows) == {"base", "PPO #1, checkpoint 1 (step 50)"}  # two samples of base are not a game
    best = rows["PPO #1, checkpoint 1 (step 50)"]
    assert (best["games"], best["wins"], best["losses"], best["ties"]) == (4, 2, 1, 1)
    assert best["win_rate"] == pytest.approx(2.5 / 4) and rows["base"]["win_rate"] == pytest.approx(1.5 / 4)
    assert best["bt_low"] < best["bt_score"] < best["bt_high"] and best["bt_score"] > rows["base"]["bt_score"]
    assert best["elo"] > 1000 > rows["base"]["elo"]
    assert labelling.rankings(db)[0]["name"] == "PPO #1, checkpoint 1 (step 50)"


# --- labels as data ---------------------------------------------------------------------------

def test_export_then_import_round_trip_keeps_provenance(project, tmp_path):
    db = project.db
    prompts = labelling.prompt_rows(db, "eval", limit=2)
    ids = list(labelling.compare_samples(db, "base", prompts, Decoding(max_new_tokens=4, temperature=1.0)))
    labelling.record_label(db, ids[0], "ann", "a", edited_text="Hi there.")
    labelling.record_label(db, ids[1], "ann", "b")
    path = tmp_path / "labels.jsonl"
    assert labelling.export_labels(db, path) == 2

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(rows[0])[:3] == ["prompt", "chosen", "rejected"]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Hi there."}]
    assert rows[0]["annotator"] == "ann" and rows[0]["labelled_at"].endswith("+00:00")
    comparison = labelling.get_comparison(db, ids[1])
    assert rows[1]["chosen_source"] == comparison["source_b"] and rows[1]["chosen_source"]["seed"] in (1, 2)
    assert rows[1]["rejected"][0]["content"] == comparison["response_a"]

    dataset_id = datasets.import_file(db, path, name="my labels")
    imported = store.pairs(db, [dataset_id])
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in imported] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_a_dpo_run_trains_on_imported_labels_and_live_labels(project, tmp_path):
    from studio.core import dpo

    db = project.db
    ids = list(labelling.compare_samples(db, "base", labelling.prompt_rows(db, "eval"),
                                         Decoding(max_new_tokens=4, temperature=1.0)))
    for cid, choice in zip(ids, ["a", "b", "tie", "a"]):
        labelling.record_label(db, cid, "ann", choice)
    labelling.export_labels(db, tmp_path / "labels.jsonl")
    dataset_id = datasets.import_file(db, tmp_path / "labels.jsonl")
    config = runs.make_config("dpo", {"dataset_ids": [dataset_id], "include_labels": True, "max_steps": 2,
                                      "batch_size": 3, "checkpoint_every": 2, "eval_max_new_tokens": 2,
                                      "lora_r": 4, "lora_alpha": 8})
    assert len(dpo.training_pairs(config, db)) == 6  # 3 imported + 3 standing A/B labels
    run_id = runs.create_run(db, config)
    assert runs.execute(project.path, run_id) == "completed"
    steps, epochs = store.run_metrics(db, run_id)["epoch"]
    assert epochs == [0.5, 1.0]  # 3 pairs per step over 6 pairs


# --- kill -9 ----------------------------------------------------------------------------------

CHILD = """
import sys, time
from studio.core import labelling, store
project = store.Project.open(sys.argv[1])
for cid in labelling.comparison_ids(project.db):
    print(labelling.record_label(project.db, cid, "ann", "a"), flush=True)
    time.sleep(0.05)
time.sleep(60)
"""


def test_every_label_reported_survives_kill_9(tmp_path):
    folder = tmp_path / "p"
    with store.Project.create(folder) as project:
        add_pairs(project.db, 40)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
    reported = [int(child.stdout.readline()) for _ in range(8)]
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    reported += [int(line) for line in child.stdout.read().split()]  # printed before the kill landed
    with store.Project.open(folder) as project:
        stored = {row["id"] for row in labelling.label_history(project.db)}
    assert len(reported) >= 8 and set(reported) <= stored


def test_checkpoints_are_named_by_their_place_in_their_run(project):
    db = project.db
    store.create_run(db, "dpo", {})  # another run's checkpoints do not shift the count
    other = store.add_checkpoint(db, 1, 5, "/nowhere")
    run_id = store.create_run(db, "ppo", {}, name="Shaping")
    ids = [store.add_checkpoint(db, run_id, step, "/nowhere") for step in (20, 0, 10)]  # stored out of order
    assert [labelling.describe_state(db, i) for i in ids] == [
        "Shaping, checkpoint 2 (step 20)", "Shaping, start (step 0)", "Shaping, checkpoint 1 (step 10)"]
    assert labelling.describe_state(db, other) == "DPO #1, checkpoint 1 (step 5)"
    assert labelling.describe_state(db, labelling.BASE) == "base"

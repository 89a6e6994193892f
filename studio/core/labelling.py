"""Preference labelling: comparisons, labels with undo, agreement, rankings of model states.

A model state is ``"base"`` or a checkpoint id. A comparison shows one prompt and two responses;
which source lands on side A is drawn per batch so that every source sits on side A and side B
equally often (within one), and the annotator sees the sources only after labelling.

Labels are never edited or deleted: each is committed on its own the moment it is given, and an
undo is a new "undo" row pointing at the label it cancels (``store.effective_labels``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from sqlite_utils import Database

from . import store

if TYPE_CHECKING:  # generation imports torch; labelling and statistics do not need it
    from .generation import Decoding

BASE = "base"
CHOICES = ("a", "b", "tie", "both_bad", "skip")
JUDGEMENTS = ("a", "b", "tie", "both_bad")  # what agreement compares; a skip is no judgement
PROMPT_SOURCES = ("eval", "train")


# --- model states -----------------------------------------------------------------------------

def checkpoint_of(state: str | int) -> int | None:
    return None if state == BASE else int(state)


def checkpoint_title(run_name: str, number: int, step: int) -> str:
    """"PPO #1, checkpoint 3 (step 24)": the run's `number`-th checkpoint after its start (0: the start),
    not the database-wide id, which means nothing to a user."""
    where = "start" if number == 0 else f"checkpoint {number}"
    return f"{run_name}, {where} (step {step})"


def checkpoint_number(run_steps: list[int], step: int) -> int:
    """Which of its run's checkpoints the one at `step` is: 1 for the first after the start (step 0 is 0)."""
    return sum(1 for s in run_steps if 0 < s <= step)


def describe_state(db: Database, state: str | int) -> str:
    """A readable name: "base" or "PPO #3, checkpoint 2 (step 50)"."""
    if state == BASE:
        return BASE
    checkpoint = store.get_checkpoint(db, int(state))
    run = store.get_run(db, checkpoint["run_id"])
    number = checkpoint_number([c["step"] for c in store.checkpoints(db, run["id"])], checkpoint["step"])
    return checkpoint_title(run["name"] or f"run #{run['id']}", number, checkpoint["step"])


def model_states(db: Database) -> list[dict]:
    """Every state a comparison can use: the base, then each checkpoint."""
    states = [{"state": BASE, "name": BASE}]
    states += [{"state": c["id"], "name": describe_state(db, c["id"])} for c in store.checkpoints(db)]
    return states


def state_provenance(db: Database, state: str | int, decoding: "Decoding") -> dict:
    """What a generated side came from, enough to regenerate it exactly."""
    source = {"kind": "model", "state": state, "name": describe_state(db, state),
              "checkpoint_id": None, "run_id": None, "run_name": None, "step": None,
              "seed": decoding.seed, "decoding": decoding.to_json()}
    if state != BASE:
        checkpoint = store.get_checkpoint(db, int(state))
        run = store.get_run(db, checkpoint["run_id"])
        source.update(checkpoint_id=checkpoint["id"], run_id=run["id"], run_name=run["name"],
                      step=checkpoint["step"])
    return source


# --- building comparisons ---------------------------------------------------------------------

def prompt_rows(db: Database, which: str = "eval", limit: int | None = None) -> list[dict]:
    """The project's eval prompts or training prompts, oldest first."""
    if which not in PROMPT_SOURCES:
        raise ValueError(f"prompts must come from one of {PROMPT_SOURCES}, not {which!r}")
    rows = store.prompts(db, eval_only=which == "eval", train_only=which == "train")
    return rows[:limit] if limit is not None else rows


def balanced_swaps(count: int, seed: int | None = None) -> list[bool]:
    """Whether to swap the two sources, per comparison: half swapped (within one), in seeded random order.

    Alternating then shuffling keeps every source on side A and side B equally often over the
    batch, while the order stays unpredictable to the annotator.
    """
    swaps = [index % 2 == 1 for index in range(count)]
    random.Random(secrets.randbits(32) if seed is None else seed).shuffle(swaps)
    return swaps


def compare_states(db: Database, state_a: str | int, state_b: str | int, prompts: list[dict],
                   decoding: "Decoding", seeds: tuple[int, int] = (0, 0), blind_seed: int | None = None,
                   device: str = "auto") -> Iterator[int]:
    """Generate two responses per prompt and store a comparison for each; yields comparison ids.

    Two different states compare models; one state with two seeds (temperature > 0) compares two
    samples of it. `seeds` are the two sides' sampling seeds (they replace ``decoding.seed``); each
    prompt is generated on its own, so a side is reproduced from its provenance alone. Each
    comparison is committed before its id is yielded, so a caller can show it while the next one
    is generated. Arguments are checked now, not at the first ``next()``.
    """
    if state_a == state_b and (decoding.temperature <= 0 or seeds[0] == seeds[1]):
        raise ValueError("Two samples of one model state need a temperature above 0 and two different seeds")
    if not prompts:
        raise ValueError("No prompts to compare on")
    for state in (state_a, state_b):
        describe_state(db, state)  # raises for an unknown checkpoint
    return _generate_comparisons(db, (state_a, state_b), prompts, decoding, seeds, blind_seed, device)


def compare_samples(db: Database, state: str | int, prompts: list[dict], decoding: "Decoding",
                    seeds: tuple[int, int] = (1, 2), blind_seed: int | None = None,
                    device: str = "auto") -> Iterator[int]:
    """Two samples of one model state (different seeds, temperature > 0) on each prompt."""
    return compare_states(db, state, state, prompts, decoding, seeds, blind_seed, device)


def _generate_comparisons(db, states, prompts, decoding, seeds, blind_seed, device) -> Iterator[int]:
    from .generation import generate
    from .models import pick_device
    from .runs import load_model_state

    device = pick_device(device)[0]
    models = {}
    for state in dict.fromkeys(states):  # one load when both sides are the same state
        models[state] = load_model_state(db, checkpoint_of(state), device)
    batch = _batch_id()
    for row, swap in zip(prompts, balanced_swaps(len(prompts), blind_seed)):
        sides = []
        for state, seed in zip(states, seeds):
            side_decoding = replace(decoding, seed=seed)
            model, tokenizer = models[state]
            text = generate(model, tokenizer, [row["prompt"]], side_decoding)[0].text
            sides.append((text, {**state_provenance(db, state, side_decoding), "batch": batch}))
        if swap:
            sides.reverse()
        with db.atomic():
            comparison_id = _insert_comparison(db, row["prompt"], sides, prompt_id=row["id"])
        yield comparison_id


def compare_pairs(db: Database, pairs: list[dict], blind_seed: int | None = None) -> list[int]:
    """Comparisons from imported preference pairs (``store.pairs``), chosen and rejected blinded."""
    names = {d["id"]: d["name"] for d in store.datasets(db)}
    batch = _batch_id()
    ids = []
    with db.atomic():
        for pair, swap in zip(pairs, balanced_swaps(len(pairs), blind_seed)):
            sides = [(_response_text(pair[role]),
                      {"kind": "pair", "name": f"{role} ({names.get(pair['dataset_id'], 'pairs')})",
                       "pair_id": pair["id"], "dataset_id": pair["dataset_id"],
                       "dataset": names.get(pair["dataset_id"]), "side": role, "batch": batch})
                     for role in ("chosen", "rejected")]
            if swap:
                sides.reverse()
            ids.append(_insert_comparison(db, pair["prompt"], sides, pair_id=pair["id"]))
    return ids


def _batch_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _response_text(value) -> str:
    """A response as plain text: conversational responses are assistant message lists."""
    if isinstance(value, list):
        return "\n\n".join(message["content"] for message in value)
    return value


def _insert_comparison(db, prompt, sides, prompt_id=None, pair_id=None) -> int:
    (text_a, source_a), (text_b, source_b) = sides
    return db["comparisons"].insert({
        "prompt": json.dumps(prompt), "prompt_id": prompt_id, "pair_id": pair_id,
        "response_a": text_a, "response_b": text_b, "source_a": json.dumps(source_a),
        "source_b": json.dumps(source_b), "created_at": time.time(),
    }).last_pk


def get_comparison(db: Database, comparison_id: int) -> dict:
    """A comparison with its prompt and sources decoded, and the name of the source it belongs to."""
    rows = list(db.query("SELECT * FROM comparisons WHERE id = ?", [comparison_id]))
    if not rows:
        raise store.ProjectError(f"No comparison with id {comparison_id} in this project")
    row = rows[0]
    comparison = {**row, "prompt": json.loads(row["prompt"]),
                  "source_a": json.loads(row["source_a"] or "{}"),
                  "source_b": json.loads(row["source_b"] or "{}")}
    comparison["source"] = source_name(comparison["source_a"], comparison["source_b"])
    return comparison


def comparison_ids(db: Database) -> list[int]:
    return [row["id"] for row in db.query("SELECT id FROM comparisons ORDER BY id")]


def source_name(source_a: dict, source_b: dict) -> str:
    """The group a comparison is counted under; the same whichever side each source landed on."""
    if source_a.get("kind") == "pair":
        return f"pairs: {source_a.get('dataset') or 'imported'}"
    if source_a.get("state") == source_b.get("state"):
        return f"{source_a.get('name')}: two samples"
    return " vs ".join(sorted([str(source_a.get("name")), str(source_b.get("name"))]))


# --- labels -----------------------------------------------------------------------------------

def record_label(db: Database, comparison_id: int, annotator: str, choice: str,
                 edited_text: str | None = None) -> int:
    """Store one label in its own committed transaction and return its id.

    "undo" cancels the annotator's last standing label with a new row. `edited_text` (the better
    answer as the annotator improved it) is only meaningful with "a" or "b".
    """
    annotator = annotator.strip()
    if not annotator:
        raise ValueError("A label needs an annotator name")
    if choice == "undo":
        last = last_standing_label(db, annotator)
        if last is None:
            raise ValueError(f"{annotator} has no label to undo")
        return undo_label(db, last["id"], annotator)
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES + ('undo',)}, not {choice!r}")
    if edited_text is not None and choice not in ("a", "b"):
        raise ValueError("Only a label that picks A or B can carry an edited answer")
    get_comparison(db, comparison_id)  # raises for an unknown comparison
    return _insert_label(db, {"comparison_id": comparison_id, "annotator": annotator,
                              "choice": choice, "edited_text": edited_text})


def undo_label(db: Database, label_id: int, annotator: str) -> int:
    """Cancel `label_id` with a new "undo" row (committed); returns the undo row's id."""
    rows = list(db.query("SELECT * FROM labels WHERE id = ?", [label_id]))
    if not rows or rows[0]["choice"] == "undo":
        raise ValueError(f"No label {label_id} to undo")
    return _insert_label(db, {"comparison_id": rows[0]["comparison_id"], "annotator": annotator.strip(),
                              "choice": "undo", "undoes_label_id": label_id})


def _insert_label(db: Database, row: dict) -> int:
    # Committed here, alone: a label the annotator saw accepted survives a kill -9 right after.
    if db.conn.in_transaction:
        raise RuntimeError("Labels commit on their own; record them outside an open transaction")
    with db.atomic():
        return db["labels"].insert({**row, "created_at": time.time()}).last_pk


def last_standing_label(db: Database, annotator: str) -> dict | None:
    standing = [label for label in store.effective_labels(db) if label["annotator"] == annotator]
    return standing[-1] if standing else None


def standing_labels(db: Database) -> dict[tuple[int, str], dict]:
    """(comparison id, annotator) -> that annotator's latest standing label on it."""
    return {(label["comparison_id"], label["annotator"]): label for label in store.effective_labels(db)}


def label_history(db: Database, comparison_id: int | None = None) -> list[dict]:
    """Every label row, undo rows included, oldest first."""
    if comparison_id is None:
        return list(db.query("SELECT * FROM labels ORDER BY id"))
    return list(db.query("SELECT * FROM labels WHERE comparison_id = ? ORDER BY id", [comparison_id]))


# --- a labelling session: what the panel drives -----------------------------------------------

@dataclass
class LabelCommand:
    """One label given in a session; undoing it writes an "undo" row (history is kept)."""

    comparison_id: int
    choice: str
    edited_text: str | None = None
    label_id: int | None = None

    def do(self, db: Database, annotator: str) -> int:
        self.label_id = record_label(db, self.comparison_id, annotator, self.choice, self.edited_text)
        return self.label_id

    def undo(self, db: Database, annotator: str) -> int:
        return undo_label(db, self.label_id, annotator)


@dataclass
class LabellingSession:
    """One annotator working through a queue of comparisons; no Qt.

    The current item is the first queued comparison this annotator has no standing label on, so a
    session reopened after a crash continues where the labels stop, and an undo brings the undone
    comparison back.
    """

    db: Database
    annotator: str
    queue: list[int] = field(default_factory=list)
    commands: list[LabelCommand] = field(default_factory=list)  # the undo stack, newest last

    def __post_init__(self) -> None:
        self.annotator = self.annotator.strip()
        if not self.annotator:
            raise ValueError("A labelling session needs an annotator name")
        self.queue = list(dict.fromkeys(self.queue))
        self._done = {cid for (cid, who) in standing_labels(self.db) if who == self.annotator}
        self._sources: dict[int, str] = {}

    def add(self, comparison_ids: list[int]) -> None:
        """Append comparisons (e.g. as a background worker generates them)."""
        known = set(self.queue)
        self.queue += [cid for cid in comparison_ids if cid not in known]

    @property
    def position(self) -> int:
        """Index in the queue of the current item (len(queue) when all are done)."""
        return next((i for i, cid in enumerate(self.queue) if cid not in self._done), len(self.queue))

    def next_item(self) -> dict | None:
        """The comparison to label now, or None when the queue is done."""
        position = self.position
        return get_comparison(self.db, self.queue[position]) if position < len(self.queue) else None

    def label(self, choice: str, edited_text: str | None = None) -> int:
        """Label the current item and move on; returns the label id."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, not {choice!r}")
        position = self.position
        if position == len(self.queue):
            raise IndexError("Nothing left to label in this session")
        command = LabelCommand(self.queue[position], choice, edited_text)
        label_id = command.do(self.db, self.annotator)
        self.commands.append(command)
        self._done.add(command.comparison_id)
        return label_id

    def undo(self) -> int | None:
        """Undo this session's last label; returns the comparison id it was on (None: nothing to undo)."""
        if not self.commands:
            return None
        command = self.commands.pop()
        command.undo(self.db, self.annotator)
        self._done.discard(command.comparison_id)
        return command.comparison_id

    def progress(self) -> dict:
        """{"done", "total", "by_source": {name: {"done", "total"}}} over this session's queue."""
        by_source: dict[str, dict] = {}
        for cid in self.queue:
            counts = by_source.setdefault(self._source(cid), {"done": 0, "total": 0})
            counts["total"] += 1
            counts["done"] += cid in self._done
        done = sum(counts["done"] for counts in by_source.values())
        return {"done": done, "total": len(self.queue), "by_source": by_source}

    def _source(self, comparison_id: int) -> str:
        if comparison_id not in self._sources:
            self._sources[comparison_id] = get_comparison(self.db, comparison_id)["source"]
        return self._sources[comparison_id]


# --- several annotators -----------------------------------------------------------------------

def annotator_counts(db: Database) -> dict[str, dict[str, int]]:
    """Per annotator: standing labels in total and per choice."""
    counts: dict[str, dict[str, int]] = {}
    for (_, annotator), label in sorted(standing_labels(db).items()):
        row = counts.setdefault(annotator, {"labels": 0, **{choice: 0 for choice in CHOICES}})
        row["labels"] += 1
        row[label["choice"]] += 1
    return counts


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two annotators' labels on the same items (None when chance agreement is 1)."""
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    categories = set(first) | set(second)
    expected = sum((first.count(c) / n) * (second.count(c) / n) for c in categories)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def agreement(db: Database) -> dict:
    """Agreement on comparisons judged by two or more annotators (skips are not judgements).

    percent_agreement is over every pair of annotators on every shared comparison; each pair of
    annotators also gets its own percent agreement and Cohen's kappa.
    """
    judged: dict[int, dict[str, str]] = {}
    for (cid, annotator), label in standing_labels(db).items():
        if label["choice"] in JUDGEMENTS:
            judged.setdefault(cid, {})[annotator] = label["choice"]
    shared = {cid: by_annotator for cid, by_annotator in judged.items() if len(by_annotator) >= 2}
    agree = total = 0
    for by_annotator in shared.values():
        for x, y in itertools.combinations(by_annotator.values(), 2):
            agree += x == y
            total += 1
    annotators = sorted({a for by_annotator in shared.values() for a in by_annotator})
    pairs = []
    for first, second in itertools.combinations(annotators, 2):
        both = [b for b in shared.values() if first in b and second in b]
        if both:
            x, y = [b[first] for b in both], [b[second] for b in both]
            pairs.append({"annotators": (first, second), "shared": len(both),
                          "percent_agreement": 100 * sum(p == q for p, q in zip(x, y)) / len(both),
                          "kappa": cohen_kappa(x, y)})
    return {"annotators": annotator_counts(db), "shared": len(shared),
            "percent_agreement": 100 * agree / total if total else None, "pairs": pairs}


# --- labels as data ---------------------------------------------------------------------------

def preference_records(db: Database) -> list[dict]:
    """TRL preference rows from the standing A/B labels, with their provenance."""
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
             "chosen_source": p["chosen_source"], "rejected_source": p["rejected_source"],
             "annotator": p["annotator"], "labelled_at": _iso(p["labelled_at"])}
            for p in store.labelled_pairs(db)]


def export_labels(db: Database, path: Path | str) -> int:
    """Write the labelled pairs as TRL preference JSONL (provenance kept); returns the row count."""
    from .datasets import export_preference_jsonl

    return export_preference_jsonl(preference_records(db), path)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


# --- rankings of model states -----------------------------------------------------------------

def games(db: Database) -> list[tuple[str | int, str | int, float]]:
    """(state A, state B, score of A) per standing label between two different model states.

    Score 1 is a win for A, 0.5 a tie; both_bad and skip say nothing about the order. Oldest first.
    """
    states = {row["id"]: (json.loads(row["source_a"] or "{}").get("state"),
                          json.loads(row["source_b"] or "{}").get("state"))
              for row in db.query("SELECT id, source_a, source_b FROM comparisons")}
    out = []
    for label in sorted(standing_labels(db).values(), key=lambda label: label["id"]):
        if label["choice"] not in ("a", "b", "tie"):
            continue
        state_a, state_b = states[label["comparison_id"]]
        if state_a is None or state_b is None or state_a == state_b:
            continue  # imported pairs, or two samples of one state
        out.append((state_a, state_b, {"a": 1.0, "b": 0.0, "tie": 0.5}[label["choice"]]))
    return out


def win_matrix(players: list, game_list: list[tuple]) -> np.ndarray:
    """wins[i, j]: how often player i beat player j (a tie gives each half a win)."""
    index = {player: i for i, player in enumerate(players)}
    wins = np.zeros((len(players), len(players)))
    for a, b, score in game_list:
        wins[index[a], index[b]] += score
        wins[index[b], index[a]] += 1 - score
    return wins


def bradley_terry(wins: np.ndarray, prior: float = 0.1, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Log-strengths and their standard errors, fitted by Newton's method.

    P(i beats j) = 1 / (1 + exp(s_j - s_i)). A Gaussian prior of precision `prior` on each s keeps
    the fit finite when a state has won (or lost) every game; with prior 0 this is the plain
    maximum-likelihood fit. Scores are centred on zero; standard errors (relative to that centre)
    come from the Fisher information.
    """
    games_ = wins + wins.T
    scores = np.zeros(len(wins))

    def objective(s):
        diff = s[:, None] - s[None, :]
        return float(np.sum(wins * -np.logaddexp(0, -diff)) - prior / 2 * np.sum(s ** 2))

    def hessian(s):
        p = _win_probabilities(s)
        h = games_ * p * (1 - p)
        return h - np.diag(h.sum(axis=1) + prior)

    for _ in range(iterations):
        gradient = (wins - games_ * _win_probabilities(scores)).sum(axis=1) - prior * scores
        step = np.linalg.pinv(-hessian(scores)) @ gradient
        size = 1.0
        while objective(scores + size * step) < objective(scores) - 1e-12 and size > 1e-6:
            size /= 2  # step halving keeps Newton from overshooting on lopsided records
        scores = scores + size * step
        if np.max(np.abs(size * step)) < 1e-10:
            break
    # Only differences of scores are identified: centre the scores, and take the errors of each
    # score relative to the mean (else the prior's vague common offset would swamp them).
    centre = np.eye(len(scores)) - 1 / len(scores)
    covariance = centre @ np.linalg.pinv(-hessian(scores)) @ centre
    return centre @ scores, np.sqrt(np.clip(np.diag(covariance), 0, None))


def _win_probabilities(scores: np.ndarray) -> np.ndarray:
    """p[i, j] = P(i beats j) under Bradley-Terry."""
    return 1 / (1 + np.exp(-(scores[:, None] - scores[None, :])))


def elo_ratings(players: list, game_list: list[tuple], k: float = 32, start: float = 1000) -> dict:
    """Sequential Elo over the games in the order they were labelled."""
    ratings = {player: start for player in players}
    for a, b, score in game_list:
        expected = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / 400))
        ratings[a] += k * (score - expected)
        ratings[b] -= k * (score - expected)
    return ratings


def rankings(db: Database, prior: float = 0.1) -> list[dict]:
    """Per model state: games, wins/losses/ties, win rate, Bradley-Terry score with a 95% CI, Elo.

    bt_score is a log-strength (0 = an average state; +0.69 = twice as likely to win against it).
    Sorted best first; plain dicts for a table or a chart.
    """
    game_list = games(db)
    players = list(dict.fromkeys(p for a, b, _ in game_list for p in (a, b)))
    if not players:
        return []
    wins = win_matrix(players, game_list)
    scores, errors = bradley_terry(wins, prior)
    elo = elo_ratings(players, game_list)
    rows = []
    for i, player in enumerate(players):
        played = float((wins[i] + wins[:, i]).sum())
        won = float(wins[i].sum())
        ties = sum(1 for a, b, s in game_list if s == 0.5 and player in (a, b))
        rows.append({
            "state": player, "name": describe_state(db, player), "games": int(round(played)),
            "wins": int(round(won - ties / 2)), "losses": int(round(played - won - ties / 2)), "ties": ties,
            "win_rate": won / played, "bt_score": float(scores[i]),
            "bt_low": float(scores[i] - 1.96 * errors[i]), "bt_high": float(scores[i] + 1.96 * errors[i]),
            "strength": math.exp(scores[i]), "elo": elo[player],
        })
    return sorted(rows, key=lambda row: row["bt_score"], reverse=True)

"""What the model says, state by state: stored checkpoint samples, fresh generations, their figures.

A model state is the base model (``None``) or a checkpoint id (the base with its run's chain of
adapters merged in). Decoding settings are plain dicts shaped like ``Decoding.to_json()``, the form
they are stored in next to every sample.

Only ``store`` is imported at module level: torch and transformers load inside the functions that
need them (in a worker thread), so the window can import this module without waiting for torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Callable

from . import advisor, labelling, store
from .defaults import SHAPING_METHODS

BASE = None
DECODING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed")
DEFAULT_DECODING = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0}


# --- model states -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StateInfo:
    state: int | None  # None: the base model
    label: str  # "Base model" or "PPO #2, checkpoint 5 (step 50)"
    run_id: int | None = None
    method: str | None = None
    step: int | None = None


def model_states(db) -> list[StateInfo]:
    """The base, then every checkpoint of every run (by run, then step)."""
    runs = {run["id"]: run for run in store.list_runs(db)}
    states = [StateInfo(BASE, "Base model")]
    for checkpoint in store.checkpoints(db):
        run = runs[checkpoint["run_id"]]
        states.append(StateInfo(checkpoint["id"], labelling.describe_state(db, checkpoint["id"]),
                                run["id"], run["method"], checkpoint["step"]))
    return states


def default_states(states: list[StateInfo]) -> list[int | None]:
    """The two states the view opens on: the latest shaping checkpoint (PPO, GRPO or RLOO) next to the
    latest DPO one when both exist, else the base next to the latest checkpoint."""
    checkpoints = [info for info in states if info.run_id is not None]
    shaping = [info.state for info in checkpoints if info.method in SHAPING_METHODS]
    settling = [info.state for info in checkpoints if info.method == "dpo"]
    if shaping and settling:
        return [shaping[-1], settling[-1]]
    return [BASE, checkpoints[-1].state if checkpoints else BASE]


class ModelCache:
    """The last few model states loaded, least recently used evicted first.

    Loading a checkpoint merges its adapter chain into a fresh base (seconds, and a full copy of
    the weights), so a few states are kept; a worker thread uses it, the lock makes that safe.
    The reward function is kept too: reward-model sources load a model of their own.
    """

    def __init__(self, capacity: int = 3, device: str = "auto",
                 loader: Callable | None = None) -> None:
        self.capacity = capacity
        self.device = device
        self._loader = loader or _load_state
        self._models: OrderedDict = OrderedDict()
        self._reward: tuple[str, object] | None = None
        self._lock = threading.Lock()

    def get(self, db, state: int | None):
        """(model, tokenizer) of `state`, loaded with `db` (the calling thread's connection) if needed."""
        with self._lock:
            if state in self._models:
                self._models.move_to_end(state)
                return self._models[state]
            while len(self._models) >= self.capacity:  # evict first: peak memory stays at capacity
                self._models.popitem(last=False)
            self._models[state] = self._loader(db, state, self.device)
            return self._models[state]

    def loaded(self) -> list[int | None]:
        """Loaded states, least recently used first."""
        return list(self._models)

    def reward_function(self, db, sources: list[dict], tokenizer):
        """The project's RewardFunction for `sources`, rebuilt only when they change."""
        from . import rewards
        from .models import pick_device

        key = json.dumps(sources, sort_keys=True)
        with self._lock:
            if self._reward is None or self._reward[0] != key:
                function = rewards.RewardFunction(sources, tokenizer, rewards.project_folder(db),
                                                  pick_device(self.device)[0])
                self._reward = (key, function)
            return self._reward[1]


def _load_state(db, state: int | None, device: str):
    from .models import pick_device
    from .runs import load_model_state

    model, tokenizer = load_model_state(db, state, pick_device(device)[0])
    return model.eval(), tokenizer


# --- outputs ----------------------------------------------------------------------------------

@dataclass
class Output:
    text: str
    response_ids: list[int] | None = None  # None for stored samples: only their text is stored
    finished: bool = False  # ended with a stop token rather than at max_new_tokens
    stored: bool = False  # written at checkpoint time
    figures: dict[str, float] = field(default_factory=dict)


def length_figures(text: str, tokens: int) -> dict[str, float]:
    return {"tokens": tokens, "words": len(text.split())}


def same_output(a: dict, b: dict) -> bool:
    """Whether two decodings give the same text: greedy decoding ignores top-p and the seed."""
    greedy = float(a.get("temperature", 0)) <= 0 and float(b.get("temperature", 0)) <= 0
    keys = ("max_new_tokens", "temperature") if greedy else DECODING_KEYS
    return all(a.get(key) == b.get(key) for key in keys)


def stored_decoding(db) -> dict:
    """The decoding of the most recent stored sample (what checkpoints used), else the default."""
    rows = list(db.query("SELECT decoding FROM samples ORDER BY id DESC LIMIT 1"))
    return {**DEFAULT_DECODING, **json.loads(rows[0]["decoding"])} if rows else dict(DEFAULT_DECODING)


def stored_outputs(db, state: int | None, prompt_ids: list[int],
                   decoding: dict | None = None) -> dict[int, Output]:
    """{prompt id: Output} stored for `state`, for those prompts; only samples made with
    `decoding` (any stored decoding when None)."""
    wanted = set(prompt_ids)
    found = {}
    for row in store.samples(db, state):
        if row["prompt_id"] not in wanted or row["sample_index"] != 0:
            continue
        if decoding is not None and not same_output(row["decoding"], decoding):
            continue
        tokens = row["scores"].get("length", 0)
        found[row["prompt_id"]] = Output(row["text"], finished=bool(row["scores"].get("finished")),
                                         stored=True, figures=length_figures(row["text"], tokens))
    return found


class GenerationCancelled(Exception):
    pass


@functools.cache
def _streamer_class():
    """A transformers streamer calling back with the text so far (transformers loads lazily)."""
    from transformers.generation.streamers import BaseStreamer

    class CallbackStreamer(BaseStreamer):
        def __init__(self, tokenizer, on_text: Callable[[str], None], cancel: threading.Event | None) -> None:
            self.tokenizer, self.on_text, self.cancel = tokenizer, on_text, cancel
            self.ids: list[int] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.cancel is not None and self.cancel.is_set():
                raise GenerationCancelled()  # generate() has no other way out mid-sequence
            if not self.prompt_seen:  # generate() first pushes the prompt
                self.prompt_seen = True
                return
            self.ids.extend(value.reshape(-1).tolist())
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            # A character split over byte tokens decodes as U+FFFD until its last byte arrives.
            if not text.endswith("\ufffd"):
                self.on_text(text)

        def end(self) -> None:
            self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    return CallbackStreamer


def generate_outputs(cache: ModelCache, db, states: list[int | None], prompt, decoding: dict,
                     on_text: Callable[[int, str], None] | None = None,
                     cancel: threading.Event | None = None) -> list[Output]:
    """One response per state to the same prompt, with the same decoding settings and seed.

    `on_text(index in states, text so far)` streams each response as its tokens come. Once
    `cancel` is set, returns early with the outputs finished so far.
    """
    outputs = []
    for index, state in enumerate(states):
        model, tokenizer = cache.get(db, state)
        stream = functools.partial(on_text, index) if on_text is not None else lambda text: None
        try:
            outputs.append(_generate_one(model, tokenizer, prompt, decoding, stream, cancel))
        except GenerationCancelled:
            break
    return outputs


def _generate_one(model, tokenizer, prompt, decoding: dict, on_text, cancel) -> Output:
    """generation.generate for one prompt (so the same seeding and stop tokens), streamed."""
    from .generation import Decoding, generate

    [generation] = generate(model, tokenizer, [prompt], Decoding(**decoding),
                            streamer=_streamer_class()(tokenizer, on_text, cancel))
    text, response = generation.text, generation.response_ids
    return Output(text, response, generation.finished, figures=length_figures(text, len(response)))


# --- figures ----------------------------------------------------------------------------------

def base_logprob(model, tokenizer, prompt, response_ids: list[int]) -> tuple[float, float]:
    """(sum, per-token mean) of log p(response | prompt) under `model`, from one forward pass."""
    import torch

    from .generation import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + list(response_ids)], device=device)
    with torch.no_grad():
        # Position i predicts token i + 1: the response's predictions start at the prompt's last token.
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    targets = torch.tensor(response_ids, device=device).unsqueeze(-1)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
    return logps.sum().item(), logps.mean().item()


def response_ids_of(tokenizer, output: Output) -> list[int]:
    """The output's token ids; a stored sample's text is re-encoded (with its stop token)."""
    if output.response_ids is not None:
        return output.response_ids
    ids = tokenizer(output.text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if output.finished else ids


def score_outputs(cache: ModelCache, db, prompt, outputs: list[Output]) -> list[Output]:
    """Copies of `outputs` with their reward and log-prob under the base model added to figures.

    Figures added: "reward" (weighted total), "reward/<source>" (each source unweighted),
    "logprob_sum" and "logprob_mean" (absent for an empty response).
    """
    if not outputs:
        return []
    model, tokenizer = cache.get(db, BASE)
    reward = cache.reward_function(db, advisor.judged_sources(db), tokenizer)  # the project's, as the advisor's
    totals, breakdown = reward([prompt] * len(outputs), [o.text for o in outputs])
    scored = []
    for index, output in enumerate(outputs):
        figures = {**output.figures, "reward": totals[index].item()}
        figures.update({f"reward/{name}": scores[index].item() for name, scores in breakdown.items()})
        ids = response_ids_of(tokenizer, output)
        if ids:
            figures["logprob_sum"], figures["logprob_mean"] = base_logprob(model, tokenizer, prompt, ids)
        scored.append(dataclasses.replace(output, figures=figures))
    return scored


# --- word differences -------------------------------------------------------------------------

_WORDS = re.compile(r"\s+|\S+")  # words and the whitespace between them, so nothing is lost


def word_diff(a: str, b: str) -> list[tuple[str, str]]:
    """Word-level differences from `a` to `b` as (op, text): op is "equal", "delete" (only in
    a) or "insert" (only in b). Equal + delete pieces rebuild a; equal + insert pieces rebuild b."""
    a_words, b_words = _WORDS.findall(a), _WORDS.findall(b)
    pieces: list[tuple[str, str]] = []
    # autojunk off: it would treat frequent words ("the") as junk in texts over 200 words.
    matcher = SequenceMatcher(None, a_words, b_words, autojunk=False)
    for tag, a1, a2, b1, b2 in matcher.get_opcodes():
        if tag == "equal":
            pieces.append(("equal", "".join(a_words[a1:a2])))
        if tag in ("delete", "replace"):
            pieces.append(("delete", "".join(a_words[a1:a2])))
        if tag in ("insert", "replace"):
            pieces.append(("insert", "".join(b_words[b1:b2])))
    return _join_changes(pieces)


def _join_changes(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fold a lone space matched between two changes into them: "red cat" -> "blue dog" reads as
    one change rather than two changes around an unchanged space."""
    joined: list[tuple[str, str]] = []
    deleted = inserted = ""
    for index, (op, text) in enumerate(pieces):
        between_changes = op == "equal" and not text.strip() and 0 < index < len(pieces) - 1
        if op == "equal" and not between_changes:
            joined += [change for change in (("delete", deleted), ("insert", inserted)) if change[1]]
            deleted = inserted = ""
            joined.append((op, text))
            continue
        if op != "insert":
            deleted += text
        if op != "delete":
            inserted += text
    return joined + [change for change in (("delete", deleted), ("insert", inserted)) if change[1]]

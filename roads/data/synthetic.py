"""Synthetic tasks with a known gold reward r*(x, y), so every policy is scored exactly and cheaply on CPU.

A prompt is a sequence of symbols drawn from a small alphabet, written as text (``"sort: c a f a ->"``); a response
is a space-separated sequence of symbols (``" a a c f"``). Each family fixes what the response should be (its
*target*) and how r* scores a response. The three families mirror the paper's three settings:

``gap`` (generation–verification gap present; the paper's full TL;DR summaries)
    The response should be the prompt's symbols in sorted order. r* = ½·order + ½·coverage: *order* is the fraction
    of adjacent response symbols that are in order, *coverage* the multiset overlap with the prompt over the longer
    length. Verifying is a handful of local checks and a count; generating needs the whole plan: at every step the
    policy must know which symbol is the smallest one not yet written, which depends on the entire prompt and on
    everything written so far, over a horizon of up to ``max_len`` tokens. Verifier simpler than generator.

``short`` (short-horizon control; the paper's two-word summaries)
    The response should be the two smallest symbols, in order. Same form of r*, against that 2-symbol target.
    With a horizon of two tokens the policy's per-token log-probabilities are as simple a function as the verifier:
    both must find the two smallest symbols. The gap is closed from the generation side.

``hidden`` (hidden-reference control; the paper's ROUGE-L reward)
    r* is the ROUGE-L F-measure (longest common subsequence) between the response and a hidden reference
    z(x) = a fixed pseudo-random substitution of the prompt's symbols (a permutation of the alphabet drawn from
    ``secret``). Nothing in the prompt reveals the substitution; only the data does. Verifying needs exactly the
    knowledge that generating needs (the substitution table), and the horizon is as long as in ``gap``. The gap is
    closed from the verification side.

``star`` (gap from a plan the demonstrations lack; :mod:`roads.data.star`)
    Path-finding on a star graph (Bachmann & Nagarajan 2024): verifying a path is local, generating it needs a
    look-up back from the goal that the plan-free demonstrator never makes. Its prompts are graphs, not symbol lists,
    so it is its own class, ``StarTask``; ``roads.data.synthetic_task`` builds it. (Measured: the tiny and small
    presets do not learn even to walk an arm from 2000 demonstrations — SFT 0.04–0.29 gold — so the default study
    does not use it yet.)

``shuffle`` (gap from a plan the demonstrator lacks, on a task the study's models can learn; the default gap family)
    The ``gap`` task (sort the prompt's symbols; the same r*), but the demonstrator writes a *uniformly random
    permutation* of the prompt's symbols (then the same edits): it never sorts. Verifying stays local (count the
    adjacent pairs out of order, count the symbols); generating the sorted order needs the plan — at each step the
    smallest symbol not yet written — which no demonstration shows. Every permutation of a prompt is equally likely
    under the demonstrator while r* ranges from ½ (coverage only) to 1, so the demonstrator's likelihood cannot
    express the reward (``gap``'s demonstrator edits the *sorted* target, so there log π_SFT ranks pairs almost as
    r* does: the paper's equivalence regime, measured Spearman 0.84). The preference pairs, two shuffles labelled
    by r*, carry the plan signal; the models can represent it (SFT on ``gap``'s sorted demonstrations reaches 0.85).

Data is drawn the way the theory assumes: SFT demonstrations come from a noisy demonstrator (the target with
random substitutions, deletions, insertions and swaps), preference pairs are two independent draws from the
behaviour policy (the same demonstrator at a higher noise level) labelled y1 ≻ y2 with probability
σ((r*(y1) − r*(y2)) / τ). Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from roads.errors import DataError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FAMILIES = ("gap", "short", "hidden", "star", "shuffle")  # star: roads.data.star.StarTask (a graph prompt, not a symbol list)
_VERBS = {"gap": "sort", "short": "min2", "hidden": "code", "star": "path", "shuffle": "order"}
PROMPT_END = " ->"
# where each family's generation–verification gap is (the report's validity section reads it: gap_class)
GAP_CLASS = {"shuffle": "gap", "star": "gap", "gap": "gap", "short": "closed (generation)",
             "hidden": "closed (verification)"}


class SymbolSettings(BaseModel):
    """The settings of the symbol-list families (``tasks.<name>``'s fields of the same names); strict as
    ``roads.settings.Strict`` (not imported: roads.settings loads task families, so this module stays below it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    family: Literal["shuffle", "gap", "short", "hidden"]
    alphabet: int = Field(8, ge=2, le=26, description="number of symbols")
    min_len: int = Field(4, ge=2, description="shortest prompt, in symbols")
    max_len: int = Field(8, ge=2, description="longest prompt, in symbols")
    secret: int = Field(1234, description="seed of the hidden substitution (family 'hidden')")


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task: a family and its sizes. ``secret`` fixes the hidden substitution (``hidden`` only)."""

    family: str
    alphabet: int = 8
    min_len: int = 4
    max_len: int = 8
    secret: int = 1234

    # the TaskFamily protocol (roads.data.family) besides the methods below
    Settings: ClassVar[type] = SymbolSettings
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    @classmethod
    def from_settings(cls, settings) -> "SyntheticTask":
        return cls(**settings.model_dump())

    @property
    def gap_class(self) -> str:
        return GAP_CLASS[self.family]

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise DataError(f"unknown synthetic family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.family == "star" and type(self).__post_init__ is SyntheticTask.__post_init__:
            raise DataError("family 'star' is roads.data.star.StarTask (its prompts are graphs); build it with "
                            "roads.data.synthetic_task or StarTask(...)")
        if not 2 <= self.alphabet <= len(LETTERS):
            raise DataError(f"alphabet must be between 2 and {len(LETTERS)}, got {self.alphabet}")
        if not 2 <= self.min_len <= self.max_len:
            raise DataError(f"need 2 <= min_len <= max_len, got min_len={self.min_len} max_len={self.max_len}")

    # --- text format -------------------------------------------------------------------------------------------
    @property
    def symbols(self) -> str:
        return LETTERS[: self.alphabet]

    @property
    def response_symbols(self) -> str:
        """The symbols a response is made of (with spaces): what a policy restricted to the task may sample."""
        return self.symbols

    def prompt(self, xs: list[str]) -> str:
        return f"{_VERBS[self.family]}: {' '.join(xs)}{PROMPT_END}"

    def parse_prompt(self, prompt: str) -> list[str]:
        head = f"{_VERBS[self.family]}: "
        if not (prompt.startswith(head) and prompt.endswith(PROMPT_END)):
            raise DataError(f"prompt {prompt!r} is not a {self.family!r} prompt (expected '{head}... ->')")
        return prompt[len(head) : -len(PROMPT_END)].split()

    @staticmethod
    def response(ys: list[str]) -> str:
        return "".join(" " + y for y in ys)

    # --- the task ------------------------------------------------------------------------------------------------
    def substitution(self) -> dict[str, str]:
        """The hidden table of the ``hidden`` family: a permutation of the alphabet fixed by ``secret``."""
        perm = list(self.symbols)
        random.Random(self.secret).shuffle(perm)
        return dict(zip(self.symbols, perm))

    def target(self, xs: list[str]) -> list[str]:
        if self.family in ("gap", "shuffle"):
            return sorted(xs)
        if self.family == "short":
            return sorted(xs)[:2]
        table = self.substitution()
        return [table[x] for x in xs]

    def gold_reward(self, prompt: str, response: str) -> float:
        """r*(x, y) in [0, 1]; 1 exactly when the response is the target."""
        xs = self.parse_prompt(prompt)
        ys = response.split()
        target = self.target(xs)
        if self.family == "hidden":
            return rouge_l(target, ys)
        return 0.5 * order_score(ys, self.symbols) + 0.5 * coverage(target, ys)

    # --- sampling ------------------------------------------------------------------------------------------------
    def sample_prompt_symbols(self, rng: random.Random) -> list[str]:
        n = rng.randint(self.min_len, self.max_len)
        return [rng.choice(self.symbols) for _ in range(n)]

    def demonstrate(self, xs: list[str], noise: float, rng: random.Random) -> list[str]:
        """The noisy demonstrator: the target with, at each position and with probability ``noise``, one random
        edit (substitute, delete, insert, or swap with the next symbol). ``shuffle``: a uniformly random
        permutation of the prompt's symbols instead of the target (the demonstrator has no plan), then the edits."""
        ys = list(self.target(xs))
        if self.family == "shuffle":
            ys = list(xs)
            rng.shuffle(ys)
        return random_edits(ys, noise, rng, self.symbols) or [rng.choice(self.symbols)]


def random_edits(ys: list[str], noise: float, rng: random.Random, choices) -> list[str]:
    """``ys`` with, at each position and with probability ``noise``, one random edit: substitute a random one of
    ``choices``, delete, insert a random one before it, or swap it with the next (every demonstrator's noise)."""
    out: list[str] = []
    i = 0
    while i < len(ys):
        if rng.random() < noise:
            edit = rng.randrange(4)
            if edit == 0:
                out.append(rng.choice(choices))
            elif edit == 1:
                pass  # delete
            elif edit == 2:
                out.extend([rng.choice(choices), ys[i]])
            elif i + 1 < len(ys):
                out.extend([ys[i + 1], ys[i]])
                i += 1
            else:
                out.append(ys[i])
        else:
            out.append(ys[i])
        i += 1
    return out


def order_score(ys: list[str], symbols: str) -> float:
    """Fraction of adjacent pairs (y_i, y_{i+1}) with y_i <= y_{i+1}; a symbol outside the alphabet breaks both
    pairs it is in. A single valid symbol is trivially ordered; an empty response scores 0."""
    if not ys:
        return 0.0
    valid = [y in symbols for y in ys]
    if len(ys) == 1:
        return 1.0 if valid[0] else 0.0
    good = sum(1 for a, b, va, vb in zip(ys, ys[1:], valid, valid[1:]) if va and vb and a <= b)
    return good / (len(ys) - 1)


def coverage(target: list[str], ys: list[str]) -> float:
    """Multiset overlap |target ∩ ys| / max(|target|, |ys|): missing and extra symbols both cost."""
    if not target and not ys:
        return 1.0
    common = sum((Counter(target) & Counter(ys)).values())
    return common / max(len(target), len(ys))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: list[str], ys: list[str]) -> float:
    """ROUGE-L F1 on symbols: 2·P·R/(P+R) with P = LCS/|ys| and R = LCS/|reference|."""
    lcs = lcs_length(reference, ys)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(ys), lcs / len(reference)
    return 2 * p * r / (p + r)


def bradley_terry_prefers_first(r1: float, r2: float, temperature: float, rng: random.Random) -> bool:
    """Draw the label y1 ≻ y2 with probability σ((r1 − r2) / τ). τ = 0 means the noiseless argmax (ties: y1)."""
    if temperature <= 0:
        return r1 >= r2
    z = (r1 - r2) / temperature
    p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return rng.random() < p


def family_name(family: object) -> str:
    """How messages name a family: a built-in's short name, else its class's path."""
    name = getattr(family, "family", None)
    return name if isinstance(name, str) else f"{type(family).__module__}:{type(family).__qualname__}"


def generate(
    task,
    *,
    seed: int,
    n_sft: int,
    n_pairs: int,
    n_val_pairs: int,
    n_eval_prompts: int,
    demo_noise: float,
    behaviour_noise: float,
    bt_temperature: float,
    n_sft_val: int = 0,
    n_select_pairs: int = 0,
) -> dict[str, list[dict]]:
    """All of a task's data, deterministic from ``seed``. Evaluation and validation prompts never occur in training.
    ``task``: any task family (:class:`roads.data.family.TaskFamily`), built-in or the user's.

    Returns the splits ``sft`` (prompt, completion), ``pairs_train`` and ``pairs_val`` (prompt, chosen, rejected,
    chosen_gold, rejected_gold) and ``eval_prompts`` (prompt, target).
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh_prompts(n: int, exclude: set[str]) -> list[list[str]]:
        out, tries = [], 0
        while len(out) < n:
            xs = task.sample_prompt_symbols(rng)
            tries += 1
            if task.prompt(xs) in exclude:
                if tries > 50 * (n + 10):
                    raise DataError(
                        f"cannot draw {n} distinct held-out prompts for {family_name(task)!r}: the prompt space is too small; "
                        "raise alphabet or max_len, or ask for fewer prompts"
                    )
                continue
            out.append(xs)
            exclude.add(task.prompt(xs))
        return out

    held_out: set[str] = set()
    eval_xs = fresh_prompts(n_eval_prompts, held_out)
    val_xs = fresh_prompts(n_val_pairs, held_out)
    seen |= held_out

    def train_prompts(n: int) -> list[list[str]]:
        out, tries = [], 0
        while len(out) < n:
            xs = task.sample_prompt_symbols(rng)
            tries += 1
            if task.prompt(xs) not in seen:
                out.append(xs)
            elif tries > 50 * (n + 10) and not out:
                raise DataError(
                    f"no training prompts left for {family_name(task)!r}: the held-out prompts use up the prompt space; "
                    "raise alphabet or max_len, or hold out fewer prompts"
                )
        return out

    sft = []
    for xs in train_prompts(n_sft):
        sft.append({"prompt": task.prompt(xs), "completion": task.response(task.demonstrate(xs, demo_noise, rng))})

    def pairs(xss: list[list[str]]) -> list[dict]:
        rows = []
        for xs in xss:
            p = task.prompt(xs)
            y1 = task.response(task.demonstrate(xs, behaviour_noise, rng))
            y2 = task.response(task.demonstrate(xs, behaviour_noise, rng))
            r1, r2 = task.gold_reward(p, y1), task.gold_reward(p, y2)
            if not bradley_terry_prefers_first(r1, r2, bt_temperature, rng):
                y1, y2, r1, r2 = y2, y1, r2, r1
            rows.append({"prompt": p, "chosen": y1, "rejected": y2, "chosen_gold": r1, "rejected_gold": r2})
        return rows

    pairs_train = pairs(train_prompts(n_pairs))
    pairs_val = pairs(val_xs)
    # held-out demonstrations (SFT's held-out NLL), drawn last so the other splits do not depend on n_sft_val
    used = seen | {r["prompt"] for r in sft} | {r["prompt"] for r in pairs_train}
    sft_val = [{"prompt": task.prompt(xs), "completion": task.response(task.demonstrate(xs, demo_noise, rng))}
               for xs in fresh_prompts(n_sft_val, used)]
    # held-out pairs for choosing hyperparameters (never reported), drawn after everything else
    pairs_select = pairs(fresh_prompts(n_select_pairs, used))
    return {
        "sft": sft,
        "sft_val": sft_val,
        "pairs_train": pairs_train,
        "pairs_val": pairs_val,
        "pairs_select": pairs_select,
        "eval_prompts": [{"prompt": task.prompt(xs), "target": task.response(task.target(xs))} for xs in eval_xs],
    }

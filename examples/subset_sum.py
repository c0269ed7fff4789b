"""A user-style task family for roads, outside the library: subset sum (a *search* gap).

The prompt is a list of digits and a target sum, ``"sum 14: 3 8 5 1 6 ->"``; the response is some of the digits,
``" 8 5 1"``. r*(x, y) = ½·valid + ½·closeness, with *valid* the fraction of the response's digits that the prompt
holds (as a multiset) and *closeness* = max(0, 1 − |Σy − T| / T).

Why it has a generation–verification gap, of a kind the built-in families do not have: verifying a response is a sum
and a count, but generating one is a search over the 2^n subsets (subset sum is NP-hard in general). The demonstrator
does not search: it writes a random subset of the prompt's digits (then random edits), so its likelihood cannot say
which subsets hit the target, while the preference pairs (two such draws, labelled by r*) do. A target exists by
construction: T is the sum of a hidden random subset of the prompt.

Run it from the project folder: ``roads run subset-sum-smoke --file examples/pipelines.yaml``.
"""

from __future__ import annotations

import random
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_items: int = Field(4, ge=2, le=9, description="fewest digits in a prompt")
    max_items: int = Field(6, ge=2, le=9, description="most digits in a prompt")


class SubsetSum:
    """The TaskFamily protocol (roads.data.family), written out."""

    Settings = Settings
    reward_range = (0.0, 1.0)
    gap_class = "gap"
    response_symbols = "123456789"

    def __init__(self, settings: Settings):
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> "SubsetSum":
        return cls(settings)

    # prompts from a seed: (digits, target)
    def sample_prompt_symbols(self, rng: random.Random) -> tuple[list[str], int]:
        n = rng.randint(self.settings.min_items, self.settings.max_items)
        digits = [str(rng.randint(1, 9)) for _ in range(n)]
        hidden = [d for d in digits if rng.random() < 0.5] or [digits[0]]
        return digits, sum(int(d) for d in hidden)

    def prompt(self, xs: tuple[list[str], int]) -> str:
        digits, total = xs
        return f"sum {total}: {' '.join(digits)} ->"

    def parse(self, prompt: str) -> tuple[list[str], int]:
        head, body = prompt.removesuffix(" ->").split(": ", 1)
        return body.split(), int(head.split()[1])

    def target(self, xs: tuple[list[str], int]) -> list[str]:
        """A subset hitting the sum (the first found by dynamic programming over the digits)."""
        digits, total = xs
        reach: dict[int, list[str]] = {0: []}
        for d in digits:
            for s, subset in list(reach.items()):
                reach.setdefault(s + int(d), subset + [d])
        return reach.get(total, [])

    @staticmethod
    def response(ys: list[str]) -> str:
        return "".join(" " + y for y in ys)

    def demonstrate(self, xs: tuple[list[str], int], noise: float, rng: random.Random) -> list[str]:
        """A random subset of the prompt's digits (no search), then with probability ``noise`` per digit a random
        digit instead."""
        digits, _ = xs
        subset = [d for d in digits if rng.random() < 0.5] or [rng.choice(digits)]
        return [str(rng.randint(1, 9)) if rng.random() < noise else d for d in subset]

    def gold_reward(self, prompt: str, response: str) -> float:
        digits, total = self.parse(prompt)
        ys = response.split()
        if not ys:
            return 0.0
        valid = sum((Counter(ys) & Counter(digits)).values()) / len(ys)
        try:
            closeness = max(0.0, 1.0 - abs(sum(int(y) for y in ys) - total) / total)
        except ValueError:  # a symbol that is not a digit
            closeness = 0.0
        return 0.5 * valid + 0.5 * closeness

"""Reverse: the prompt's symbols in reverse order — a user-style TaskFamily for the tests (roads.data.family).

The prompt is ``"reverse: a c b ->"``, the best response ``" b c a"``; r* is the positional match against that target
(``own_family.reward``). The demonstrator writes the target with random substitutions. Its class is "closed
(generation)" as declared for the tests: the demonstrator edits the target, so the policy's likelihood follows r*.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from .reward import positional_match

SYMBOLS = "abcdef"


class ReverseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_len: int = Field(3, ge=1, le=8, description="shortest prompt, in symbols")
    max_len: int = Field(5, ge=1, le=8, description="longest prompt, in symbols")


class Reverse:
    Settings = ReverseSettings
    reward_range = (0.0, 1.0)
    gap_class = "closed (generation)"
    response_symbols = SYMBOLS

    def __init__(self, settings: ReverseSettings):
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: ReverseSettings) -> "Reverse":
        return cls(settings)

    def sample_prompt_symbols(self, rng: random.Random) -> list[str]:
        return [rng.choice(SYMBOLS) for _ in range(rng.randint(self.settings.min_len, self.settings.max_len))]

    def prompt(self, xs: list[str]) -> str:
        return f"reverse: {' '.join(xs)} ->"

    def target(self, xs: list[str]) -> list[str]:
        return list(reversed(xs))

    @staticmethod
    def response(ys: list[str]) -> str:
        return "".join(" " + y for y in ys)

    def demonstrate(self, xs: list[str], noise: float, rng: random.Random) -> list[str]:
        return [rng.choice(SYMBOLS) if rng.random() < noise else y for y in self.target(xs)]

    def gold_reward(self, prompt: str, response: str) -> float:
        xs = prompt.removeprefix("reverse: ").removesuffix(" ->").split()
        return positional_match(self.target(xs), response.split())

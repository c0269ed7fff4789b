"""Families that are not right, each one mistake on top of own_family.family:Reverse — the bad-family matrix of
tests/flows/test_bad_family.py (each must stop ``roads run`` with one line naming it, exit 2, before anything runs)."""

from __future__ import annotations

from .family import Reverse


class RewardAboveRange(Reverse):
    """r* = 2 on a perfect response: outside its declared reward_range (0, 1)."""

    def gold_reward(self, prompt, response):
        return 2.0 * super().gold_reward(prompt, response)


class RewardNaN(Reverse):
    def gold_reward(self, prompt, response):
        return float("nan")


class RewardText(Reverse):
    def gold_reward(self, prompt, response):
        return f"{super().gold_reward(prompt, response):.2f}"


class RewardRaises(Reverse):
    def gold_reward(self, prompt, response):
        return 1.0 / len(response.split())  # ZeroDivisionError on the empty response


class DemonstratorOffVocabulary(Reverse):
    """Writes capitals, which are not among its response_symbols."""

    def demonstrate(self, xs, noise, rng):
        return [y.upper() for y in super().demonstrate(xs, noise, rng)]


class NoGoldReward:
    """Not a family: everything but a gold reward."""

    Settings = Reverse.Settings
    reward_range = (0.0, 1.0)
    gap_class = "gap"
    response_symbols = "abc"
    from_settings = Reverse.from_settings
    sample_prompt_symbols = Reverse.sample_prompt_symbols
    prompt = Reverse.prompt
    target = Reverse.target
    response = Reverse.response
    demonstrate = Reverse.demonstrate

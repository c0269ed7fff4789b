"""The paper's hypotheses H1–H6 as measurable effects, and the rule that turns an effect's interval into a verdict.

Each hypothesis names one effect the study measures — a paired gold-reward difference between two policies on one task
family, or a paired difference in held-out preference log-likelihood between two kinds of verifier — and what the
hypothesis predicts for it: ``+`` (a positive effect) or ``0`` (no difference). The policies are those of the H
pipelines in ``pipelines.yaml``; a row whose policies a run lacks is left out.

The verdict rule (:func:`verdict`), with [lo, hi] the effect's bootstrap interval and m the equivalence margin
(``report.equivalence_margin``, in the effect's units):

- predicted ``+``: **supported** when lo > 0; **refuted** when hi < m (no effect as large as the margin is
  compatible with the data); otherwise **inconclusive**.
- predicted ``0``: **supported** when −m ≤ lo and hi ≤ m (the interval lies inside the margin: practically no
  difference, even if it excludes zero); else **refuted** when the interval excludes zero (lo > 0 or hi < 0);
  otherwise **inconclusive**.

Before any of these, the controls (:func:`gated_verdict`): a hypothesis whose task failed a validity check that
gates its kind (``roads/validity.py``: the positive controls, SFT's convergence, the displacement check and the
resolution for policy effects; the labels' ceiling for verifier effects; and, for H6's control families, the gap
family's own class checks) is **not testable (which control failed)**, whatever its interval says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VERDICTS = ("supported", "refuted", "inconclusive", "not testable")


@dataclass(frozen=True)
class Hypothesis:
    id: str
    claim: str  # why online might win
    experiment: str
    family: str  # the task family the effect is measured on
    kind: Literal["policies", "verifiers"]  # gold-reward difference of policies, or log-likelihood difference of verifiers
    a: str  # the policy (or verifier kind) measured
    b: str  # what it is compared with
    predicted: Literal["+", "0"]  # what the hypothesis predicts for a − b
    needs_gap: bool = False  # it reads a control family against the gap family: the gap family must carry a gap

    @property
    def effect(self) -> str:
        unit = "gold reward" if self.kind == "policies" else "held-out preference log-likelihood"
        return f"{unit}: {self.a} − {self.b} ({self.family})"


HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis("H1", "on-policy samples carry information absent from the offline data",
               "online DPO from SFT labelled by a verifier that is the offline data's own fit (the offline DPO "
               "policy's implicit reward), against offline DPO",
               "gap", "policies", "online_dpo_data", "offline_dpo", "+"),
    Hypothesis("H2", "offline DPO regularises towards π_ref worse than online does",
               "online and offline DPO with the same β and the same SFT reference; if regularisation were the "
               "reason, the online advantage would vanish",
               "gap", "policies", "online_dpo_sft", "offline_dpo", "0"),
    Hypothesis("H3", "online is the easier optimisation problem",
               "online DPO with 3× the prompts (augmentation from the SFT prompts), against online DPO",
               "gap", "policies", "online_dpo_aug3", "online_dpo_sft", "+"),
    Hypothesis("H4", "reward models can use wider data than policies",
               "reward model and policies trained on the same narrow pairs (SFT samples labelled by the gold "
               "reward); if wider data were the reason, online would not beat offline here",
               "gap", "policies", "online_dpo_narrow", "offline_dpo_narrow", "0"),
    Hypothesis("H5", "global reward models generalise better than the policy's own (local) rewards",
               "held-out preference log-likelihood of the global reward model against the DPO implicit reward, "
               "trained on the same pairs",
               "gap", "verifiers", "global", "implicit", "+"),
    Hypothesis("H5b", "global reward models generalise better than local reward models",
               "held-out preference log-likelihood of the global reward model against the local reward model "
               "(BT loss on the LM's summed log-probabilities)",
               "gap", "verifiers", "global", "local", "+"),
    Hypothesis("H6-short", "the generation–verification gap (control: gap closed on the generation side)",
               "online − offline DPO on the 2-token family; H6 predicts no online advantage",
               "short", "policies", "online_dpo_sft", "offline_dpo", "0", needs_gap=True),
    Hypothesis("H6-hidden", "the generation–verification gap (control: gap closed on the verification side)",
               "online − offline DPO on the hidden-reference family; H6 predicts no online advantage",
               "hidden", "policies", "online_dpo_sft", "offline_dpo", "0", needs_gap=True),
)


def verdict(lo: float, hi: float, predicted: str, margin: float) -> str:
    """The rule in the module docstring: 'supported', 'refuted' or 'inconclusive'."""
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is reversed")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if predicted == "+":
        if lo > 0:
            return "supported"
        return "refuted" if hi < margin else "inconclusive"
    if predicted == "0":
        if -margin <= lo and hi <= margin:
            return "supported"
        return "refuted" if lo > 0 or hi < 0 else "inconclusive"
    raise ValueError(f"predicted must be '+' or '0', got {predicted!r}")


def gated_verdict(lo: float, hi: float, predicted: str, margin: float, failed_checks: list[str]) -> str:
    """``verdict``, unless a control failed: then 'not testable (<the failed checks> failed)'."""
    if failed_checks:
        return f"not testable ({', '.join(failed_checks)} failed)"
    return verdict(lo, hi, predicted, margin)

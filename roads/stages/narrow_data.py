"""narrow_data: preference pairs drawn from the SFT policy itself and labelled by the gold judge (H4).

The paper's H4 asks whether the generation–verification gap survives when the reward model *and* the policies are
trained on a narrow dataset: one whose responses all come from the SFT policy, so the data covers no more than the
policy already does. This stage makes that dataset. For each row of the input's ``pairs_train.jsonl`` (the same
prompts, in the same order, one pair per row) it samples two completions y1, y2 from the SFT policy and labels
y1 ≻ y2 with probability σ((r*(y1) − r*(y2)) / τ), τ = ``bt_temperature`` (the same Bradley–Terry labelling
``prepare_data`` uses; τ = 0: the better one wins, ties broken by a coin). It needs a task with a gold reward r*.

Inputs: ``data`` (a ``prepare_data`` folder) and ``sft`` (the policy whose samples make the pairs).

Output: a complete data folder, so any stage that reads ``prepare_data`` output can read this one: ``task.json``,
``sft.jsonl``, ``sft_val.jsonl``, ``pairs_val.jsonl`` and ``eval_prompts.jsonl`` copied unchanged, the new ``pairs_train.jsonl``
(prompt, chosen, rejected, chosen_gold, rejected_gold) and ``budget.json`` (tokens generated).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import NarrowDataConfig
from roads.data import gold_of
from roads.data.synthetic import bradley_terry_prefers_first
from roads.errors import RoadsError
from roads.generation import sample
from roads.models import load_policy
from roads.training import NullTracker, Tracker

VERSION = 1
COPIED = ("task.json", "sft.jsonl", "sft_val.jsonl", "pairs_val.jsonl", "pairs_select.jsonl", "eval_prompts.jsonl")


def prefers_first(r1: float, r2: float, temperature: float, rng: random.Random) -> bool:
    """y1 ≻ y2 with probability σ((r1 − r2) / τ); at τ = 0 the better one, and a fair coin on a tie."""
    if temperature <= 0 and r1 == r2:
        return rng.random() < 0.5
    return bradley_terry_prefers_first(r1, r2, temperature, rng)


def label_pairs(prompts: list[str], completions: list[tuple[str, str]], gold: Callable[[str, str], float],
                temperature: float, rng: random.Random) -> list[dict]:
    """One labelled pair per prompt, with the gold reward of each side (the columns ``prepare_data`` writes)."""
    rows = []
    for prompt, (y1, y2) in zip(prompts, completions, strict=True):
        r1, r2 = gold(prompt, y1), gold(prompt, y2)
        if not prefers_first(r1, r2, temperature, rng):
            y1, y2, r1, r2 = y2, y1, r2, r1
        rows.append({"prompt": prompt, "chosen": y1, "rejected": y2, "chosen_gold": r1, "rejected_gold": r2})
    return rows


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: NarrowDataConfig = spec.config()
    data = Path(inputs["data"].path)
    task_name, gold = gold_of(data)
    if gold is None:
        raise RoadsError(f"narrow_data: needs a task with a gold reward to label the pairs; {task_name!r} "
                         "(real preference data) has none")
    prompts = [r["prompt"] for r in read_jsonl(data / "pairs_train.jsonl")]
    if not prompts:
        raise RoadsError(f"narrow_data: {data / 'pairs_train.jsonl'} has no rows, so there are no prompts to sample")

    model, tokenizer = load_policy(inputs["sft"].path)
    tracker.progress(f"sampling {len(prompts)} prompts x 2 from the SFT policy")
    groups = sample(model, tokenizer, prompts, n=2, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    seed=spec.seed, batch_size=cfg.generation_batch_size)
    tokens_generated = sum(len(c.ids) for group in groups for c in group)
    pairs = label_pairs(prompts, [(g[0].text, g[1].text) for g in groups], gold, cfg.bt_temperature,
                        random.Random(spec.seed))

    for name in COPIED:
        shutil.copyfile(data / name, out_dir / name)
    extra = [name for name in ("ceiling.json",) if (data / name).is_file()]  # pairs_val unchanged: same ceiling
    for name in extra:
        shutil.copyfile(data / name, out_dir / name)
    write_jsonl(out_dir / "pairs_train.jsonl", pairs)
    write_json(out_dir / "budget.json", {"tokens_generated": tokens_generated})

    n = len(pairs)
    metrics = {
        "narrow_data/n_pairs": float(n),
        "narrow_data/pairs_gold_agreement": sum(r["chosen_gold"] > r["rejected_gold"] for r in pairs) / n,
        "narrow_data/pairs_gold_ties": sum(r["chosen_gold"] == r["rejected_gold"] for r in pairs) / n,
        "narrow_data/chosen_gold_mean": sum(r["chosen_gold"] for r in pairs) / n,
        "narrow_data/tokens_generated": float(tokens_generated),
    }
    tracker.progress(f"{n} pairs, gold agreement {metrics['narrow_data/pairs_gold_agreement']:.2f}, "
                     f"ties {metrics['narrow_data/pairs_gold_ties']:.2f}, {tokens_generated} tokens")
    return StageResult(metrics=metrics, files=[*COPIED, "pairs_train.jsonl", "budget.json", *extra])

"""Does a reward model's held-out accuracy depend on float noise? Scores every selection and validation pair of a
task's reward models at three batch sizes (different padding, so the same text's score differs in the last bits)
and prints the accuracy counted two ways: the sign of every margin (noise on a pair of identical texts counted as a
win or a loss), and with identical pairs as exact ties (``roads.verifiers.same_text``, what every stage uses). The
second must not move with the batch size.

    python bench/tie_invariance.py --home /tmp/run/.roads [--pipeline default] [--task short]

Reads a state folder that holds the pipeline's reward models (run the pipeline first); trains nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", required=True, help="the state folder (ROADS_HOME) that holds the run")
    parser.add_argument("--pipeline", default="default")
    parser.add_argument("--task", default="short")
    parser.add_argument("--batch-sizes", default="64,16,7")
    args = parser.parse_args()
    os.environ["ROADS_HOME"] = args.home
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from roads.artifacts import read_jsonl
    from roads.config import load_study
    from roads.generation import reward_scores
    from roads.models import load_reward_model
    from roads.plan import build_plan
    from roads.verifiers import preference_metrics, same_text
    from tasks.keys import cached_results

    nodes = build_plan(load_study("pipelines.yaml", args.pipeline, []))
    known = cached_results(nodes)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"| seed | split | identical pairs | accuracy, sign of the margin (batch {', '.join(map(str, sizes))}) | "
          "identical pairs tied |")
    print("|---|---|---:|---|---|")
    seeds = sorted({n.spec.seed for n in nodes if n.id.startswith(f"{args.task}/")})
    for seed in seeds:
        rm, data = (known.get(f"{args.task}/seed{seed}/{stage}") for stage in ("reward_model", "prepare_data"))
        if not rm or not data:
            sys.exit(f"{args.home}: {args.task}/seed{seed} has no cached reward_model; run `roads run {args.pipeline}`")
        model, tokenizer = load_reward_model(rm["artifact"]["path"])
        for split in ("pairs_select", "pairs_val"):
            rows = read_jsonl(Path(data["artifact"]["path"]) / f"{split}.jsonl")
            prompts = [r["prompt"] for r in rows]
            identical = same_text([r["chosen"] for r in rows], [r["rejected"] for r in rows])
            signed, tied = [], []
            for size in sizes:
                chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size=size)
                rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size=size)
                signed.append(preference_metrics(chosen, rejected)["accuracy"])
                tied.append(preference_metrics(chosen, rejected, identical)["accuracy"])
            print(f"| {seed} | {split} | {sum(identical)} of {len(rows)} | {' / '.join(f'{a:.4f}' for a in signed)} | "
                  f"{' / '.join(f'{a:.4f}' for a in tied)} |", flush=True)


if __name__ == "__main__":
    main()

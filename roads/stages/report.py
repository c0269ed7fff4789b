"""report: the study table — every arm × task over its seeds, with bootstrap intervals, and the paired
difference of each arm against the offline baseline.

Inputs are evaluate outputs (any names; each folder holds ``metrics.json`` and ``samples.jsonl``). Per sample:
gold reward, win against the SFT sample of the same prompt and index (1, ties 0.5, else 0), the KL term
log π − log π_ref and the length. Each prompt is first reduced to the mean over its samples; a seed's value is the
mean over its prompts and an arm's point estimate the mean over its seeds (every seed weighs the same).

Intervals are percentile intervals of a hierarchical bootstrap: each replicate draws the seeds with replacement,
then, inside every drawn seed, its prompts with replacement (all samples of a prompt go together). The paired
difference arm − baseline is bootstrapped on per-(seed, prompt) differences over the seeds and prompts both arms
share, so both arms see the same resample. Each (task, arm) group has its own generator, seeded from
``bootstrap_seed`` and the group's name, so adding an arm does not move the others' intervals.

Output: ``report.md``, ``report.csv`` (one row per task × arm), ``paired.csv`` (task, arm, baseline, metric, diff,
lo, hi, excludes_zero), ``report.json`` (the same numbers, for programs) and two plots, ``win_rate_by_arm.png`` and
``gold_vs_kl.png``. Without a gold reward (real data) only KL and length are reported and there are no paired rows.
"""

from __future__ import annotations

import csv
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from roads.artifacts import ArtifactRef, StageResult, read_json, read_jsonl, write_json
from roads.config import ReportConfig, StageSpec
from roads.errors import DataError
from roads.training import NullTracker, Tracker

VERSION = 1

METRICS = ("gold_reward_mean", "win_rate", "kl_to_reference", "length_mean")
GOLD_METRICS = ("gold_reward_mean", "win_rate")
PAIRED_METRICS = {"gold_reward_mean": "gold_reward_diff", "win_rate": "win_rate_diff"}
ARM_ORDER = ("sft", "sft_chosen", "offline_dpo", "offline_dpo_2x", "online_dpo_sft", "online_dpo_dpo",
             "online_dpo_gold", "online_rl")
TASK_FAMILIES = ("gap", "short", "hidden")
FILES = ["report.md", "report.csv", "paired.csv", "report.json", "win_rate_by_arm.png", "gold_vs_kl.png"]
_CHUNK = 1 << 20  # bootstrap draws (replicates × seeds × prompts) held in memory at once


# --------------------------------------------------------------------------- the bootstrap


def bootstrap_interval(
    per_seed: Sequence[np.ndarray],
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and hierarchical-bootstrap percentile interval of a mean over seeds of means over prompts.

    ``per_seed`` holds one array per seed, shape ``(n_prompts_s,)`` or ``(n_prompts_s, n_metrics)``: the per-prompt
    values (already averaged over a prompt's samples). Each replicate draws the seeds with replacement and, inside
    each drawn seed, its prompts with replacement; all metrics share the draws. Returns ``(mean, lo, hi)``, each of
    shape ``(n_metrics,)`` — or 0-d arrays when the inputs were 1-d. Deterministic given ``rng`` (a seed or a
    ``numpy.random.Generator``).
    """
    if not per_seed:
        raise ValueError("bootstrap_interval needs at least one seed")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    squeeze = np.ndim(per_seed[0]) == 1
    arrays = [np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in per_seed]
    n_metrics = arrays[0].shape[1]
    if any(a.shape[1] != n_metrics for a in arrays) or any(len(a) == 0 for a in arrays):
        raise ValueError("every seed needs at least one prompt and the same number of metrics")

    point = np.mean([a.mean(axis=0) for a in arrays], axis=0)
    n_prompts = np.array([len(a) for a in arrays])
    offsets = np.concatenate([[0], np.cumsum(n_prompts)[:-1]])
    n_seeds, max_prompts, total = len(arrays), int(n_prompts.max()), int(n_prompts.sum())
    # metric-major, plus one zero column that the padding draws of seeds with fewer prompts point at
    table = np.concatenate([np.concatenate(arrays).T, np.zeros((n_metrics, 1))], axis=1)  # (M, total + 1)
    ragged = bool((n_prompts != max_prompts).any())

    seeds = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
    stats = np.empty((n_bootstrap, n_metrics))
    step = max(1, _CHUNK // (n_seeds * max_prompts))
    for start in range(0, n_bootstrap, step):
        chosen = seeds[start:start + step]  # (c, S) which seed fills each slot
        size = n_prompts[chosen][..., None]  # (c, S, 1)
        local = (rng.random((*chosen.shape, max_prompts)) * size).astype(np.int64)  # (c, S, P) prompts drawn
        index = offsets[chosen][..., None] + local
        if ragged:
            index = np.where(np.arange(max_prompts) < size, index, total)
        seed_means = np.take(table, index, axis=1).sum(axis=-1) / size[..., 0]  # (M, c, S)
        stats[start:start + step] = seed_means.mean(axis=-1).T
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha], axis=0)
    if squeeze:
        return point[0], lo[0], hi[0]
    return point, lo, hi


# --------------------------------------------------------------------------- reading evaluate outputs


@dataclass
class Group:
    """One (task, arm): per seed, the prompt indices and the per-prompt means of every metric it has."""

    task: str
    arm: str
    metrics: tuple[str, ...]
    seeds: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # seed -> (prompt ids, (P, M))


def per_prompt(rows: list[dict], gold: bool, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted prompt indices, per-prompt means of [gold, win,] KL term, length)."""
    try:
        prompt = np.array([r["prompt_index"] for r in rows], dtype=np.int64)
        columns = [
            np.array([r["logp"] - r["ref_logp"] for r in rows], dtype=np.float64),
            np.array([r["length"] for r in rows], dtype=np.float64),
        ]
        if gold:
            g = np.array([r["gold_reward"] for r in rows], dtype=np.float64)
            ref = np.array([r["reference_gold_reward"] for r in rows], dtype=np.float64)
            columns = [g, np.where(g > ref, 1.0, np.where(g == ref, 0.5, 0.0)), *columns]
    except KeyError as err:
        raise DataError(f"{where}: a row lacks the column {err}") from None
    ids, inverse = np.unique(prompt, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    sums = np.stack([np.bincount(inverse, weights=c, minlength=len(ids)) for c in columns], axis=1)
    return ids, sums / counts[:, None]


def load_groups(inputs: dict[str, ArtifactRef]) -> dict[tuple[str, str], Group]:
    groups: dict[tuple[str, str], Group] = {}
    for name, ref in inputs.items():
        folder = Path(ref.path)
        for file in ("metrics.json", "samples.jsonl"):
            if not (folder / file).is_file():
                raise DataError(f"report input {name!r}: {folder / file} is missing (not an evaluate output?)")
        info = read_json(folder / "metrics.json")
        missing = [k for k in ("arm", "task", "seed") if k not in info]
        if missing:
            raise DataError(f"{folder / 'metrics.json'}: missing key(s) {', '.join(missing)}")
        task, arm, seed = str(info["task"]), str(info["arm"]), int(info["seed"])
        rows = read_jsonl(folder / "samples.jsonl")
        if not rows:
            raise DataError(f"{folder / 'samples.jsonl'}: no samples")
        has_gold = [("gold_reward" in r and "reference_gold_reward" in r) for r in rows]
        gold = all(has_gold)
        if any(has_gold) and not gold:
            raise DataError(f"{folder / 'samples.jsonl'}: gold_reward is present on some rows and not on others")
        metrics = METRICS if gold else METRICS[2:]
        group = groups.setdefault((task, arm), Group(task, arm, metrics))
        if group.metrics != metrics:
            raise DataError(f"report: task {task!r}, arm {arm!r} has gold rewards in some seeds and not in others")
        if seed in group.seeds:
            raise DataError(f"report: task {task!r}, arm {arm!r}, seed {seed} appears twice (input {name!r})")
        group.seeds[seed] = per_prompt(rows, gold, folder / "samples.jsonl")
    return groups


def arm_key(arm: str) -> tuple[int, str]:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


def task_key(task: str) -> int:
    return next((i for i, family in enumerate(TASK_FAMILIES) if task.startswith(family)), len(TASK_FAMILIES))


def group_rng(bootstrap_seed: int, *labels: str) -> np.random.Generator:
    return np.random.default_rng([bootstrap_seed, zlib.crc32("/".join(labels).encode())])


def metric_key(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_/]", "_", "report/" + "/".join(parts))


# --------------------------------------------------------------------------- the tables


def summarise(group: Group, cfg: ReportConfig) -> dict:
    seeds = sorted(group.seeds)
    rng = group_rng(cfg.bootstrap_seed, group.task, group.arm)
    point, lo, hi = bootstrap_interval([group.seeds[s][1] for s in seeds], n_bootstrap=cfg.n_bootstrap,
                                       confidence=cfg.confidence, rng=rng)
    prompts = set().union(*(group.seeds[s][0].tolist() for s in seeds))
    return {
        "task": group.task,
        "arm": group.arm,
        "seeds": seeds,
        "n_prompts": len(prompts),
        "metrics": {m: {"mean": round(float(point[i]), 6), "lo": round(float(lo[i]), 6), "hi": round(float(hi[i]), 6)}
                    for i, m in enumerate(group.metrics)},
    }


def paired(group: Group, base: Group, cfg: ReportConfig) -> list[dict]:
    """arm − baseline in the gold metrics, on the (seed, prompt) pairs both have; [] when they share none."""
    cols = [group.metrics.index(m) for m in GOLD_METRICS]
    diffs = []
    for seed in sorted(set(group.seeds) & set(base.seeds)):
        (ids_a, a), (ids_b, b) = group.seeds[seed], base.seeds[seed]
        common, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
        if len(common):
            diffs.append(a[ia][:, cols] - b[ib][:, cols])
    if not diffs:
        return []
    point, lo, hi = bootstrap_interval(diffs, n_bootstrap=cfg.n_bootstrap, confidence=cfg.confidence,
                                       rng=group_rng(cfg.bootstrap_seed, group.task, group.arm, "-", base.arm))
    out = []
    for i, m in enumerate(GOLD_METRICS):
        d, l, h = (round(float(x[i]), 6) for x in (point, lo, hi))
        out.append({"task": group.task, "arm": group.arm, "baseline": base.arm, "metric": m, "diff": d, "lo": l,
                    "hi": h, "excludes_zero": bool(l > 0 or h < 0), "seeds": len(diffs),
                    "n_pairs": int(sum(len(x) for x in diffs))})
    return out


def fmt(cell: dict | None, interval: bool = True) -> str:
    if cell is None:
        return "–"
    if not interval:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]"


def write_markdown(path: Path, rows: list[dict], pairs: list[dict], cfg: ReportConfig) -> None:
    pct = f"{100 * cfg.confidence:g}%"
    lines = [
        "# roads report",
        "",
        f"Intervals are {pct} percentile bootstrap intervals over seeds and prompts (seeds resampled, then prompts "
        f"within each seed; {cfg.n_bootstrap} resamples, bootstrap seed {cfg.bootstrap_seed}).",
        "",
        "| task | arm | seeds | gold reward [lo, hi] | win rate vs SFT [lo, hi] | KL | length |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['task']} | {r['arm']} | {len(r['seeds'])} | {fmt(m.get('gold_reward_mean'))} | "
                     f"{fmt(m.get('win_rate'))} | {fmt(m['kl_to_reference'])} | {fmt(m['length_mean'])} |")
    lines += ["", f"## Paired difference against {cfg.baseline}", ""]
    if pairs:
        lines += [
            f"Arm − {cfg.baseline}, paired by (seed, prompt); * marks an interval that excludes zero.",
            "",
            "| task | arm | metric | diff [lo, hi] | excludes zero |",
            "|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(f"| {p['task']} | {p['arm']} | {p['metric']} | {p['diff']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}] "
                         f"| {'*' if p['excludes_zero'] else ''} |")
    else:
        lines.append(f"No paired differences (they need a gold reward and the {cfg.baseline} arm in the same task).")
    path.write_text("\n".join(lines) + "\n")


def write_csvs(out_dir: Path, rows: list[dict], pairs: list[dict]) -> None:
    with open(out_dir / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "arm", "seeds", "n_prompts", *(f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi"))])
        for r in rows:
            cells = []
            for m in METRICS:
                c = r["metrics"].get(m)
                cells += ["", "", ""] if c is None else [c["mean"], c["lo"], c["hi"]]
            w.writerow([r["task"], r["arm"], len(r["seeds"]), r["n_prompts"], *cells])
    with open(out_dir / "paired.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "arm", "baseline", "metric", "diff", "lo", "hi", "excludes_zero"])
        for p in pairs:
            w.writerow([p[k] for k in ("task", "arm", "baseline", "metric", "diff", "lo", "hi", "excludes_zero")])


# --------------------------------------------------------------------------- the plots


def write_plots(out_dir: Path, rows: list[dict], tasks: list[str], arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"Software": None}
    gold_rows = [r for r in rows if "win_rate" in r["metrics"]]
    gold_tasks = [t for t in tasks if any(r["task"] == t for r in gold_rows)]
    gold_arms = [a for a in arms if any(r["arm"] == a for r in gold_rows)]
    by = {(r["task"], r["arm"]): r["metrics"] for r in gold_rows}

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(gold_arms) + 2), 4.5))
    if gold_rows:
        width = 0.8 / len(gold_tasks)
        for j, task in enumerate(gold_tasks):
            xs, ys, err = [], [], [[], []]
            for i, arm in enumerate(gold_arms):
                if (task, arm) in by:
                    c = by[(task, arm)]["win_rate"]
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(c["mean"])
                    err[0].append(max(0.0, c["mean"] - c["lo"]))
                    err[1].append(max(0.0, c["hi"] - c["mean"]))
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=task)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(gold_arms)), gold_arms, rotation=30, ha="right")
        ax.set_ylabel("win rate vs SFT (gold reward)")
        ax.set_ylim(0, 1)
        ax.legend(title="task")
    else:
        ax.text(0.5, 0.5, "no gold reward: win rates unavailable", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Win rate against SFT by arm and task")
    fig.tight_layout()
    fig.savefig(out_dir / "win_rate_by_arm.png", dpi=100, metadata=meta)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    if gold_rows:
        markers = "osD^v<>ph*"
        for j, task in enumerate(gold_tasks):
            label: str | None = task
            for arm in gold_arms:
                if (task, arm) not in by:
                    continue
                g, kl = by[(task, arm)]["gold_reward_mean"], by[(task, arm)]["kl_to_reference"]
                yerr = [[max(0.0, g["mean"] - g["lo"])], [max(0.0, g["hi"] - g["mean"])]]
                ax.errorbar([kl["mean"]], [g["mean"]], yerr=yerr, fmt=markers[j % len(markers)], color=f"C{j % 10}",
                            capsize=3, label=label)
                label = None
                ax.annotate(arm, (kl["mean"], g["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("KL(π ‖ π_ref)")
        ax.set_ylabel("gold reward")
        ax.legend(title="task")
    else:
        ax.text(0.5, 0.5, "no gold reward", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Gold reward against KL to the reference")
    fig.tight_layout()
    fig.savefig(out_dir / "gold_vs_kl.png", dpi=100, metadata=meta)
    plt.close(fig)


# --------------------------------------------------------------------------- the stage


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: ReportConfig = spec.config()
    out_dir = Path(out_dir)
    if not inputs:
        raise DataError("report: no evaluate outputs to report on")
    groups = load_groups(inputs)
    first_seen = list(dict.fromkeys(task for task, _ in groups))
    tasks = sorted(first_seen, key=task_key)  # stable: first-seen order within a family
    arms = sorted({arm for _, arm in groups}, key=arm_key)
    ordered = [groups[(t, a)] for t in tasks for a in arms if (t, a) in groups]

    rows = [summarise(g, cfg) for g in ordered]
    pairs: list[dict] = []
    for g in ordered:
        base = groups.get((g.task, cfg.baseline))
        gold = base is not None and "win_rate" in g.metrics and "win_rate" in base.metrics
        if g.arm in (cfg.baseline, "sft") or not gold:
            continue
        pairs += paired(g, base, cfg)

    write_markdown(out_dir / "report.md", rows, pairs, cfg)
    write_csvs(out_dir, rows, pairs)
    write_json(out_dir / "report.json", {
        "confidence": cfg.confidence,
        "n_bootstrap": cfg.n_bootstrap,
        "bootstrap_seed": cfg.bootstrap_seed,
        "baseline": cfg.baseline,
        "tasks": tasks,
        "arms": arms,
        "rows": rows,
        "paired": pairs,
    })
    write_plots(out_dir, rows, tasks, arms)

    metrics: dict[str, float] = {}
    for r in rows:
        for m, c in r["metrics"].items():
            metrics[metric_key(r["task"], r["arm"], m)] = c["mean"]
    for p in pairs:
        name = PAIRED_METRICS[p["metric"]]
        metrics[metric_key(p["task"], p["arm"], name)] = p["diff"]
        metrics[metric_key(p["task"], p["arm"], name + "_lo")] = p["lo"]
        metrics[metric_key(p["task"], p["arm"], name + "_hi")] = p["hi"]
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    wins = sum(p["excludes_zero"] and p["diff"] > 0 for p in pairs if p["metric"] == "gold_reward_mean")
    losses = sum(p["excludes_zero"] and p["diff"] < 0 for p in pairs if p["metric"] == "gold_reward_mean")
    n_pairs = sum(p["metric"] == "gold_reward_mean" for p in pairs)
    tracker.progress(f"{len(rows)} rows ({len(tasks)} tasks × {len(arms)} arms); against {cfg.baseline}: "
                     f"{wins} better, {losses} worse, {n_pairs - wins - losses} unresolved of {n_pairs}")
    return StageResult(metrics=metrics, files=list(FILES))

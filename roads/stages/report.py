"""report: the study table — every policy × task over its seeds, with bootstrap intervals, and the paired
difference of each policy against the offline baseline.

Inputs are evaluate outputs (any names; each folder holds ``metrics.json`` and ``samples.jsonl``). Per sample:
gold reward, win against the SFT sample of the same prompt and index (1, ties 0.5, else 0), the KL term
log π − log π_ref and the length. Each prompt is first reduced to the mean over its samples; a seed's value is the
mean over its prompts and a policy's point estimate the mean over its seeds (every seed weighs the same).

Intervals are percentile intervals of a hierarchical bootstrap: each replicate draws the seeds with replacement,
then, inside every drawn seed, its prompts with replacement (all samples of a prompt go together). The paired
difference policy − baseline is bootstrapped on per-(seed, prompt) differences over the seeds and prompts both policies
share, so both policies see the same resample. Each (task, policy) group has its own generator, seeded from
``bootstrap_seed`` and the group's name, so adding a policy does not move the others' intervals.

Output: ``report.md``, ``report.csv`` (one row per task × policy), ``paired.csv`` (task, policy, baseline, metric, diff,
lo, hi, excludes_zero), ``report.json`` (the same numbers, for programs) and two plots, ``win_rate_by_policy.png`` and
``gold_vs_kl.png``. The report opens with the validity section (``roads.validity``: every check per task with its
value, pre-registered threshold and pass/fail; also ``validity.csv``); a hypothesis whose controls fail is "not
testable". Without a gold reward (real data) the main table has only KL and length and there are no paired rows;
where a held-out verifier judged the samples (``evaluate.judge``: a ``judge_margin`` per sample) a section of its
own, "the proxy-judged table", adds the finished rate and the proxy win rate against SFT, labelled as a proxy, under
the judge's name, the pairs it trained on and its held-out accuracy on ``pairs_val``.

Inputs that are ``gap`` outputs (a ``gap.json``) feed the gap section (``roads.gap_report``): ``gap_summary.md``
(the gap per task beside online − offline, the verifier table, best-of-N tables) and the plots ``best_of_n.png``,
``gap_vs_online.png``, and ``learning_curves.png`` / ``scale.png`` when the run varies the number of pairs or the
model sizes. Always: ``hypotheses.md`` / ``hypotheses.csv``, the H1–H6 table for the rows this run can measure.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from roads.artifacts import ArtifactRef, StageResult, read_json, read_jsonl, write_json
from roads.gap_report import (bon_rows, gap_summary, hypothesis_rows, is_gap_output, load_gap, save_figure, verifier_diffs,
                              verifier_rows, write_gap_markdown, write_gap_plots, write_hypotheses)
from roads.metrics import bootstrap_interval, group_rng
from roads.config import StageSpec
from roads.settings import ReportConfig
from roads.stage_table import GOLD_METRICS as GOLD_METRICS_OF_TABLE, POLICY_METRICS
from roads.errors import DataError
from roads.selection import SELECTION_FILE
from roads.hypotheses import HYPOTHESES, gated_verdict
from roads.training import NullTracker, Tracker
from roads import validity

VERSION = 1

METRICS, GOLD_METRICS = POLICY_METRICS[:4], GOLD_METRICS_OF_TABLE  # gold reward, win rate, KL, length
# without a gold reward: also the finished rate, and — judged by a held-out verifier (evaluate.judge) — the proxy
PROXY_METRICS = ("finished_rate", "proxy_win_rate")
PAIRED_METRICS = {"gold_reward_mean": "gold_reward_diff", "win_rate": "win_rate_diff"}
TASK_FAMILIES = ("shuffle", "star", "gap", "short", "hidden")
# the task class each hypothesis' `family` stands for (roads/hypotheses.py)
HYPOTHESIS_CLASSES = {"gap": "gap", "short": "closed (generation)", "hidden": "closed (verification)"}
FILES = ["report.md", "report.csv", "paired.csv", "report.json", "validity.csv", "win_rate_by_policy.png", "gold_vs_kl.png"]


# --------------------------------------------------------------------------- reading evaluate outputs


@dataclass
class Group:
    """One (task, policy): per seed, the prompt indices and the per-prompt means of every metric it has."""

    task: str
    policy: str
    metrics: tuple[str, ...]
    seeds: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # seed -> (prompt ids, (P, M))
    policy_stage: str | None = None  # the stage that trained the policy, and on how many examples (learning curves)
    train_examples: int | None = None
    judges: dict[int, dict] = field(default_factory=dict)  # seed -> the judge of proxy_win_rate (evaluate.judge)


def per_prompt(rows: list[dict], gold: bool, where: Path, proxy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sorted prompt indices, per-prompt means of [gold, win,] KL term, length[, finished, proxy win]). ``proxy``:
    rows without a gold reward judged by a held-out verifier (``judge_margin``: > 0 a win, 0 half)."""
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
        elif proxy:
            margin = np.array([r["judge_margin"] for r in rows], dtype=np.float64)
            columns += [np.array([float(r["finished"]) for r in rows], dtype=np.float64),
                        np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))]
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
        missing = [k for k in ("policy", "task", "seed") if k not in info]
        if missing:
            raise DataError(f"{folder / 'metrics.json'}: missing key(s) {', '.join(missing)}")
        task, policy, seed = str(info["task"]), str(info["policy"]), int(info["seed"])
        rows = read_jsonl(folder / "samples.jsonl")
        if not rows:
            raise DataError(f"{folder / 'samples.jsonl'}: no samples")
        has_gold = [("gold_reward" in r and "reference_gold_reward" in r) for r in rows]
        gold = all(has_gold)
        if any(has_gold) and not gold:
            raise DataError(f"{folder / 'samples.jsonl'}: gold_reward is present on some rows and not on others")
        proxy = not gold and all("judge_margin" in r for r in rows)
        metrics = METRICS if gold else METRICS[2:] + (PROXY_METRICS if proxy else ())
        group = groups.setdefault((task, policy), Group(task, policy, metrics))
        if group.metrics != metrics:
            raise DataError(f"report: task {task!r}, policy {policy!r} has gold rewards in some seeds and not in others")
        if seed in group.seeds:
            raise DataError(f"report: task {task!r}, policy {policy!r}, seed {seed} appears twice (input {name!r})")
        group.seeds[seed] = per_prompt(rows, gold, folder / "samples.jsonl", proxy)
        if proxy:
            group.judges[seed] = {k: info.get(k) for k in JUDGE_KEYS}
        group.policy_stage, group.train_examples = info.get("policy_stage"), info.get("train_examples")
    return groups


JUDGE_KEYS = ("judge", "judge_kind", "judge_trained_on", "judge_train_pairs", "judge_val_accuracy", "judge_val_loglik",
              "judge_val_pairs")


def judge_lines(rows: list[dict], cfg: ReportConfig) -> list[str]:
    """The section for tasks without a gold reward whose policies a held-out verifier judged: KL, length, finished rate
    and the proxy win rate against SFT, under the judge's name, what it trained on and its held-out accuracy."""
    proxied = [r for r in rows if "proxy_win_rate" in r["metrics"]]
    if not proxied:
        return []
    lines = ["", "## Without a gold reward: the proxy-judged table", "",
             "**A proxy, not a gold reward.** The win rate against the SFT sample of the same prompt is judged by a "
             "held-out verifier (a policy can also win by pleasing the judge); read it beside the judge's own held-out "
             "accuracy, its ceiling."]
    for task in dict.fromkeys(r["task"] for r in proxied):
        judges = {json.dumps(j, sort_keys=True): j for r in proxied if r["task"] == task for j in r["judges"]}
        for j in judges.values():
            acc = j.get("judge_val_accuracy")
            held = "held out from every policy" if j.get("judge_trained_on") == "pairs_judge" else (
                "NOT held out: the policies trained on the same pairs")
            lines.append(f"- {task}: judge `{j.get('judge')}` ({j.get('judge_kind')} verifier) trained on "
                         f"{j.get('judge_train_pairs')} {j.get('judge_trained_on')} pairs ({held}); held-out accuracy "
                         f"{'–' if acc is None else f'{acc:.3f}'} on {j.get('judge_val_pairs')} pairs_val pairs "
                         "(no policy and no judge trained on them)")
    lines += ["", "| task | policy | seeds | KL | length | finished rate | proxy win rate vs SFT [lo, hi] | judge |",
              "|---|---|---:|---|---|---|---|---|"]
    for r in proxied:
        m = r["metrics"]
        names = ", ".join(dict.fromkeys(str(j.get("judge")) for j in r["judges"]))
        lines.append(f"| {r['task']} | {r['policy']} | {len(r['seeds'])} | {fmt(m['kl_to_reference'])} | "
                     f"{fmt(m['length_mean'])} | {fmt(m['finished_rate'])} | {fmt(m['proxy_win_rate'])} | {names} |")
    return lines


def task_key(task: str) -> int:
    return next((i for i, family in enumerate(TASK_FAMILIES) if task.startswith(family)), len(TASK_FAMILIES))


def metric_key(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_/]", "_", "report/" + "/".join(parts))


# --------------------------------------------------------------------------- the tables


def summarise(group: Group, cfg: ReportConfig) -> dict:
    seeds = sorted(group.seeds)
    rng = group_rng(cfg.bootstrap_seed, group.task, group.policy)
    point, lo, hi = bootstrap_interval([group.seeds[s][1] for s in seeds], n_bootstrap=cfg.n_bootstrap,
                                       confidence=cfg.confidence, rng=rng)
    prompts = set().union(*(group.seeds[s][0].tolist() for s in seeds))
    judged = {"judges": [group.judges[s] for s in seeds]} if group.judges else {}
    return {
        **judged,
        "task": group.task,
        "policy": group.policy,
        "seeds": seeds,
        "n_prompts": len(prompts),
        "metrics": {m: {"mean": round(float(point[i]), 6), "lo": round(float(lo[i]), 6), "hi": round(float(hi[i]), 6)}
                    for i, m in enumerate(group.metrics)},
    }


def paired(group: Group, base: Group, cfg: ReportConfig) -> list[dict]:
    """policy − baseline in the gold metrics, on the (seed, prompt) pairs both have; [] when they share none."""
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
                                       rng=group_rng(cfg.bootstrap_seed, group.task, group.policy, "-", base.policy))
    out = []
    for i, m in enumerate(GOLD_METRICS):
        d, l, h = (round(float(x[i]), 6) for x in (point, lo, hi))
        out.append({"task": group.task, "policy": group.policy, "baseline": base.policy, "metric": m, "diff": d, "lo": l,
                    "hi": h, "excludes_zero": bool(l > 0 or h < 0), "seeds": len(diffs),
                    "n_pairs": int(sum(len(x) for x in diffs))})
    return out


def fmt(cell: dict | None, interval: bool = True) -> str:
    if cell is None:
        return "–"
    if not interval:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]"


def write_markdown(path: Path, rows: list[dict], pairs: list[dict], cfg: ReportConfig,
                   validity_lines: list[str] = ()) -> None:
    pct = f"{100 * cfg.confidence:g}%"
    lines = [
        "# roads report",
        "",
        *validity_lines,
        *(["", "## The roads", ""] if validity_lines else []),
        f"Intervals are {pct} percentile bootstrap intervals over seeds and prompts (seeds resampled, then prompts "
        f"within each seed; {cfg.n_bootstrap} resamples, bootstrap seed {cfg.bootstrap_seed}).",
        "",
        "| task | policy | seeds | gold reward [lo, hi] | win rate vs SFT [lo, hi] | KL | length |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['task']} | {r['policy']} | {len(r['seeds'])} | {fmt(m.get('gold_reward_mean'))} | "
                     f"{fmt(m.get('win_rate'))} | {fmt(m['kl_to_reference'])} | {fmt(m['length_mean'])} |")
    lines += judge_lines(rows, cfg)
    lines += ["", f"## Paired difference against {cfg.baseline}", ""]
    if pairs:
        lines += [
            f"Policy − {cfg.baseline}, paired by (seed, prompt); * marks an interval that excludes zero.",
            "",
            "| task | policy | metric | diff [lo, hi] | excludes zero |",
            "|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(f"| {p['task']} | {p['policy']} | {p['metric']} | {p['diff']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}] "
                         f"| {'*' if p['excludes_zero'] else ''} |")
    else:
        lines.append(f"No paired differences (they need a gold reward and the {cfg.baseline} policy in the same task).")
    path.write_text("\n".join(lines) + "\n")


def write_csvs(out_dir: Path, rows: list[dict], pairs: list[dict]) -> None:
    columns = [*METRICS, *(m for m in PROXY_METRICS if any(m in r["metrics"] for r in rows))]
    with open(out_dir / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "policy", "seeds", "n_prompts", *(f"{m}{s}" for m in columns for s in ("", "_lo", "_hi"))])
        for r in rows:
            cells = []
            for m in columns:
                c = r["metrics"].get(m)
                cells += ["", "", ""] if c is None else [c["mean"], c["lo"], c["hi"]]
            w.writerow([r["task"], r["policy"], len(r["seeds"]), r["n_prompts"], *cells])
    with open(out_dir / "paired.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "policy", "baseline", "metric", "diff", "lo", "hi", "excludes_zero"])
        for p in pairs:
            w.writerow([p[k] for k in ("task", "policy", "baseline", "metric", "diff", "lo", "hi", "excludes_zero")])


# --------------------------------------------------------------------------- the plots


def finish_plot(fig, ax, path: Path, title: str, empty: str | None = None) -> None:
    """Title and save a plot; ``empty``: the plot has no data, say why in its place."""
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(title)
    save_figure(fig, path)


def win_rate_shown(rows: list[dict]) -> str:
    """The win rate the bar chart plots: the gold one where some policy has it, else the proxy (a held-out judge's)."""
    return "win_rate" if any("win_rate" in r["metrics"] for r in rows) else "proxy_win_rate"


def write_plots(out_dir: Path, rows: list[dict], tasks: list[str], policies: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gold_rows = [r for r in rows if "win_rate" in r["metrics"]]
    gold_tasks = [t for t in tasks if any(r["task"] == t for r in gold_rows)]
    gold_policies = [a for a in policies if any(r["policy"] == a for r in gold_rows)]
    by = {(r["task"], r["policy"]): r["metrics"] for r in gold_rows}
    win = win_rate_shown(rows)  # without a gold reward, the held-out judge's proxy win rate, labelled as such
    win_rows = [r for r in rows if win in r["metrics"]]
    win_tasks = [t for t in tasks if any(r["task"] == t for r in win_rows)]
    win_policies = [a for a in policies if any(r["policy"] == a for r in win_rows)]
    win_by = {(r["task"], r["policy"]): r["metrics"] for r in win_rows}

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(win_policies) + 2), 4.5))
    if win_rows:
        width = 0.8 / len(win_tasks)
        for j, task in enumerate(win_tasks):
            xs, ys, err = [], [], [[], []]
            for i, policy in enumerate(win_policies):
                if (task, policy) in win_by:
                    c = win_by[(task, policy)][win]
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(c["mean"])
                    err[0].append(max(0.0, c["mean"] - c["lo"]))
                    err[1].append(max(0.0, c["hi"] - c["mean"]))
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=task)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(win_policies)), win_policies, rotation=30, ha="right")
        ax.set_ylabel("win rate vs SFT (gold reward)" if win == "win_rate"
                      else "proxy win rate vs SFT\n(a held-out judge, not a gold reward)")
        ax.set_ylim(0, 1)
        ax.legend(title="task")
    finish_plot(fig, ax, out_dir / "win_rate_by_policy.png",
                "Win rate against SFT by policy and task" if win == "win_rate"
                else "Proxy win rate against SFT (a held-out judge)",
                empty=None if win_rows else "no gold reward and no judge: win rates unavailable")

    fig, ax = plt.subplots(figsize=(7, 5))
    if gold_rows:
        markers = "osD^v<>ph*"
        for j, task in enumerate(gold_tasks):
            label: str | None = task
            for policy in gold_policies:
                if (task, policy) not in by:
                    continue
                g, kl = by[(task, policy)]["gold_reward_mean"], by[(task, policy)]["kl_to_reference"]
                yerr = [[max(0.0, g["mean"] - g["lo"])], [max(0.0, g["hi"] - g["mean"])]]
                ax.errorbar([kl["mean"]], [g["mean"]], yerr=yerr, fmt=markers[j % len(markers)], color=f"C{j % 10}",
                            capsize=3, label=label)
                label = None
                ax.annotate(policy, (kl["mean"], g["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("KL(π ‖ π_ref)")
        ax.set_ylabel("gold reward")
        ax.legend(title="task")
    finish_plot(fig, ax, out_dir / "gold_vs_kl.png", "Gold reward against KL to the reference",
                empty=None if gold_rows else "no gold reward")


# --------------------------------------------------------------------------- the stage


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: ReportConfig = spec.config()
    out_dir = Path(out_dir)
    if not inputs:
        raise DataError("report: no evaluate or gap outputs to report on")
    gap_inputs = {name: Path(ref.path) for name, ref in inputs.items() if is_gap_output(ref.path)}
    select_inputs = {name: Path(ref.path) for name, ref in inputs.items() if (Path(ref.path) / SELECTION_FILE).is_file()}
    groups = load_groups({name: ref for name, ref in inputs.items() if name not in gap_inputs | select_inputs})
    gap = load_gap(gap_inputs)
    first_seen = list(dict.fromkeys([*(task for task, _ in groups), *gap.info]))
    tasks = sorted(first_seen, key=task_key)  # stable: first-seen order within a family
    found = list(dict.fromkeys(policy for _, policy in groups))  # the policies in the order of `report.policies` (the
    policies = [a for a in cfg.policies if a in found] + [a for a in found if a not in cfg.policies]  # pipeline's stages)
    ordered = [groups[(t, a)] for t in tasks for a in policies if (t, a) in groups]

    rows = [summarise(g, cfg) for g in ordered]
    pairs: list[dict] = []
    for g in ordered:
        base = groups.get((g.task, cfg.baseline))
        gold = base is not None and "win_rate" in g.metrics and "win_rate" in base.metrics
        if g.policy in (cfg.baseline, "sft") or not gold:
            continue
        pairs += paired(g, base, cfg)

    def policy_effect(task: str, a: str, b: str) -> dict | None:
        """The paired gold-reward difference a − b on ``task``, or None when the run lacks either policy."""
        ga, gb = groups.get((task, a)), groups.get((task, b))
        if ga is None or gb is None or "gold_reward_mean" not in ga.metrics or "gold_reward_mean" not in gb.metrics:
            return None
        found = next((p for p in pairs if p["task"] == task and p["policy"] == a and p["baseline"] == b
                      and p["metric"] == "gold_reward_mean"), None)
        found = found or next((p for p in paired(ga, gb, cfg) if p["metric"] == "gold_reward_mean"), None)
        return None if found is None else {"mean": found["diff"], "lo": found["lo"], "hi": found["hi"]}

    vrows, vdiffs, brows = verifier_rows(gap, cfg), verifier_diffs(gap, cfg), bon_rows(gap, cfg)
    summary = gap_summary(gap, vdiffs, brows, lambda task: policy_effect(task, cfg.contrast, cfg.baseline))
    # validity first: could this run detect the effect? (roads/validity.py)
    einfo = validity.evaluate_infos({n: Path(r.path) for n, r in inputs.items()
                                     if n not in gap_inputs | select_inputs})
    ginfos = validity.gap_infos(gap_inputs)
    chosen = validity.selection_lines(einfo, select_inputs, cfg, ginfos)
    classes, task_family = {}, {}  # a task's class is its family's gap_class (a user family's from its class)
    for task in tasks:
        family = next((i[0].get("family") for (t, _), i in einfo.items() if t == task and i[0].get("family")), None)
        family = family or (TASK_FAMILIES[task_key(task)] if task_key(task) < len(TASK_FAMILIES) else None)
        task_family.update({task: family} if family else {})
        if validity.gap_class(family):
            classes[task] = validity.gap_class(family)
    checks = validity.checks(tasks, classes, einfo, ginfos, policy_effect, cfg)
    families = {}
    for family, cls in HYPOTHESIS_CLASSES.items():
        task = next((t for t in tasks if classes.get(t) == cls), None)
        if task is not None:
            families[family] = task
    hypotheses = hypothesis_rows(families, policy_effect, vdiffs, cfg.equivalence_margin)
    by_id = {h.id: h for h in HYPOTHESES}
    for row in hypotheses:
        h = by_id[row["id"]]
        failed = validity.failed(checks, row["task"], ("policies",) if h.kind == "policies" else ("verifiers",))
        if h.needs_gap:
            gap_task = families.get("gap")
            failed += ([f"{gap_task}:{n}" for n in validity.failed(checks, gap_task, ("gap",))] if gap_task
                       else ["gap family not run"])
        row["verdict"] = gated_verdict(row["lo"], row["hi"], row["predicted"], cfg.equivalence_margin, failed)
    policy_points = [{"task": r["task"], "policy": g.policy, "stage": g.policy_stage, "train_examples": g.train_examples,
                   "gold": r["metrics"]["gold_reward_mean"]}
                  for g, r in zip(ordered, rows) if g.train_examples and "gold_reward_mean" in r["metrics"]
                  and g.policy_stage not in (None, "sft")]

    files = list(FILES)
    write_markdown(out_dir / "report.md", rows, pairs, cfg,
                   validity.write_markdown(checks, classes, task_family) + chosen)
    with open(out_dir / "validity.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "class", "check", "value", "threshold", "passed", "gates"])
        for c in checks:
            w.writerow([c.task, classes.get(c.task, ""), c.name, c.value, c.threshold, c.passed, c.gates])
    write_csvs(out_dir, rows, pairs)
    write_plots(out_dir, rows, tasks, policies)
    write_hypotheses(out_dir, hypotheses, cfg)
    files += ["hypotheses.md", "hypotheses.csv"]
    if gap.info:
        write_gap_markdown(out_dir / "gap_summary.md", summary, vrows, vdiffs, brows, cfg, policy_points)
        files += ["gap_summary.md", *write_gap_plots(out_dir, summary, vrows, brows, policy_points, cfg.series)]
    with open(out_dir / "report.md", "a") as fh:
        fh.write("\nSee also: " + ", ".join(f"[{f}]({f})" for f in files if f.endswith(".md") and f != "report.md")
                 + ".\n")
    write_json(out_dir / "report.json", {
        "confidence": cfg.confidence,
        "n_bootstrap": cfg.n_bootstrap,
        "bootstrap_seed": cfg.bootstrap_seed,
        "baseline": cfg.baseline,
        "tasks": tasks,
        "policies": policies,
        "rows": rows,
        "paired": pairs,
        "gap_summary": summary,
        "verifiers": vrows,
        "verifier_diffs": vdiffs,
        "best_of_n": brows,
        "learning_curve_points": policy_points,
        "hypotheses": hypotheses,
        "classes": classes,
        "families": task_family,
        "validity": [c.row() for c in checks],
    })

    metrics: dict[str, float] = {}
    for r in rows:
        for m, c in r["metrics"].items():
            metrics[metric_key(r["task"], r["policy"], m)] = c["mean"]
    for p in pairs:
        name = PAIRED_METRICS[p["metric"]]
        metrics[metric_key(p["task"], p["policy"], name)] = p["diff"]
        metrics[metric_key(p["task"], p["policy"], name + "_lo")] = p["lo"]
        metrics[metric_key(p["task"], p["policy"], name + "_hi")] = p["hi"]
    for r in summary:
        for key in ("loglik_global_minus_implicit", "loglik_global_minus_local"):
            if key in r:
                for part in ("mean", "lo", "hi"):
                    metrics[metric_key("gap", r["task"], key + ("" if part == "mean" else f"_{part}"))] = r[key][part]
    for c in checks:
        metrics[metric_key("validity", c.task, c.name)] = float(c.passed)
    for h in hypotheses:
        metrics[metric_key("hypotheses", h["id"], "effect")] = h["mean"]
        metrics[metric_key("hypotheses", h["id"], "supported")] = float(h["verdict"] == "supported")
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    wins = sum(p["excludes_zero"] and p["diff"] > 0 for p in pairs if p["metric"] == "gold_reward_mean")
    losses = sum(p["excludes_zero"] and p["diff"] < 0 for p in pairs if p["metric"] == "gold_reward_mean")
    n_pairs = sum(p["metric"] == "gold_reward_mean" for p in pairs)
    for c in checks:
        tracker.progress(f"validity {c.task} {c.name}: {c.value} ({c.threshold}) → {'pass' if c.passed else 'FAIL'}")
    tracker.progress(f"{len(rows)} rows ({len(tasks)} tasks × {len(policies)} policies); against {cfg.baseline}: "
                     f"{wins} better, {losses} worse, {n_pairs - wins - losses} unresolved of {n_pairs}")
    for h in hypotheses:
        tracker.progress(f"{h['id']}: {h['effect']} = {h['mean']:.3f} [{h['lo']:.3f}, {h['hi']:.3f}] → {h['verdict']}")
    return StageResult(metrics=metrics, files=files)

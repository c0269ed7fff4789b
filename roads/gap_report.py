"""The report's gap section: the verifier table, best-of-N curves, learning curves, the scale table, the per-family
gap summary, and the hypotheses table. Reads ``measure_gap`` stage outputs; the report stage (``roads.stages.report``) calls
it with the policy rows it has already computed.

**The gap, as a number.** The paper manipulated the generation–verification gap but never measured it. Here, per
task, it is the held-out preference log-likelihood of the global reward model minus that of the DPO implicit reward
(β·log π_DPO/π_ref), both fitted to the same pairs, paired by validation pair with a hierarchical bootstrap (seeds,
then pairs). A positive gap says the pairs are explained better by a separate verifier than by the generator's own
likelihood ratio: verifying is the easier function to learn from this data. Beside it: how much of the gold
best-of-N headroom each verifier recovers from SFT samples, and the online − offline DPO difference it is meant to
explain.

**Validity numbers** (where ``measure_gap`` wrote them; older gap outputs simply lack the columns): the verifier
table sets the labels' Bayes ceiling (verifier ``gold``: r*/τ on the same held-out pairs) beside every learnt
verifier, with each verifier's headroom = (value − chance)/(ceiling − chance), a ratio of means paired by pair and
bootstrapped like the rest, and its on-policy accuracy on pairs of the first policy's samples ordered by r*. The
validity table per task: the ceiling, the Spearman correlation of log π_SFT with r*, each policy's greedy gold reward,
and the relative gap (Song et al. 2024) = the best-of-N headroom with its interval.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from roads.artifacts import read_json, read_jsonl
from roads.errors import DataError
from roads.hypotheses import HYPOTHESES, verdict
from roads.metrics import bootstrap_interval, group_rng

GAP_FILES = ("gap.json", "verifier_pairs.jsonl", "best_of_n.jsonl")  # required; onpolicy_pairs.jsonl is read if there
GOLD = "gold"
CHANCE_ACCURACY, CHANCE_LOGLIK = 0.5, -float(np.log(2.0))
KIND_ORDER = ("global", "local", "implicit", "gold")
KIND_LABEL = {"global": "global RM", "local": "local RM", "implicit": "DPO implicit", "gold": "gold (upper bound)"}
VERIFIER_DIFFS = (("global", "implicit"), ("global", "local"), ("local", "implicit"))


def save_figure(fig, path: Path) -> str:
    """Lay out, write as PNG without a Software tag (the bytes depend on the data alone) and close; the file's name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path.name


def is_gap_output(folder: str | Path) -> bool:
    return (Path(folder) / "gap.json").is_file()


@dataclass
class Series:
    """Per seed: (sorted item ids, per-item values of shape (n_items, n_columns))."""

    seeds: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, seed: int, ids: np.ndarray, values: np.ndarray, where: str) -> None:
        if seed in self.seeds:
            raise DataError(f"report: {where}: seed {seed} appears twice")
        order = np.argsort(ids, kind="stable")
        self.seeds[seed] = (ids[order], values[order])


@dataclass
class GapData:
    """Everything read from the gap outputs of a run, by task."""

    info: dict[str, dict] = field(default_factory=dict)  # task -> gap.json of its first seed
    ns: dict[str, list[int]] = field(default_factory=dict)
    verifiers: dict[tuple[str, str], Series] = field(default_factory=dict)  # (task, verifier) -> [correct, loglik]
    bon: dict[tuple[str, str, str], Series] = field(default_factory=dict)  # (task, policy, verifier) -> curve
    infos: dict[str, list[dict]] = field(default_factory=dict)  # task -> the gap.json of every seed
    # (task, verifier) -> on-policy pairs [correct, expected_correct, loglik, label_p] (NaN where τ was unknown)
    onpolicy: dict[tuple[str, str], Series] = field(default_factory=dict)


def load_gap(folders: dict[str, Path]) -> GapData:
    data = GapData()
    for name, folder in folders.items():
        for file in GAP_FILES:
            if not (folder / file).is_file():
                raise DataError(f"report input {name!r}: {folder / file} is missing (not a gap output?)")
        info = read_json(folder / "gap.json")
        try:
            task, seed, ns = str(info["task"]), int(info["seed"]), [int(n) for n in info["ns"]]
            info["verifiers"]
        except KeyError as err:
            raise DataError(f"{folder / 'gap.json'}: missing key {err}") from None
        if data.ns.setdefault(task, ns) != ns:
            raise DataError(f"report: task {task!r} has gap outputs with different N grids ({data.ns[task]} and {ns})")
        data.info.setdefault(task, info)
        data.infos.setdefault(task, []).append(info)
        rows: dict[str, list[dict]] = {}
        for r in read_jsonl(folder / "verifier_pairs.jsonl"):
            rows.setdefault(r["verifier"], []).append(r)
        for verifier, vr in rows.items():
            ids = np.array([r["pair_index"] for r in vr], dtype=np.int64)
            values = np.array([[r["correct"], r["loglik"]] for r in vr], dtype=np.float64)
            data.verifiers.setdefault((task, verifier), Series()).add(seed, ids, values, f"{task}/{verifier}")
        curves: dict[tuple[str, str], list[dict]] = {}
        for r in read_jsonl(folder / "best_of_n.jsonl"):
            curves.setdefault((r["policy"], r["verifier"]), []).append(r)
        for (policy, verifier), cr in curves.items():
            ids = np.array([r["prompt_index"] for r in cr], dtype=np.int64)
            values = np.array([r["values"] for r in cr], dtype=np.float64)
            if values.shape[1] != len(ns):
                raise DataError(f"{folder / 'best_of_n.jsonl'}: curves have {values.shape[1]} points, ns has {len(ns)}")
            data.bon.setdefault((task, policy, verifier), Series()).add(seed, ids, values, f"{task}/{policy}/{verifier}")
        pairs: dict[str, list[dict]] = {}
        if (folder / "onpolicy_pairs.jsonl").is_file():
            for r in read_jsonl(folder / "onpolicy_pairs.jsonl"):
                pairs.setdefault(r["verifier"], []).append(r)
        num = lambda v: np.nan if v is None else float(v)  # noqa: E731
        for verifier, pr in pairs.items():
            ids = np.array([r["pair_index"] for r in pr], dtype=np.int64)
            values = np.array([[num(r["correct"]), num(r["expected_correct"]), num(r["loglik"]), num(r["label_p"])]
                               for r in pr], dtype=np.float64)
            data.onpolicy.setdefault((task, verifier), Series()).add(seed, ids, values, f"{task}/onpolicy/{verifier}")
    return data


def interval(series: Series, cfg, *labels: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seeds = sorted(series.seeds)
    return bootstrap_interval([series.seeds[s][1] for s in seeds], n_bootstrap=cfg.n_bootstrap,
                              confidence=cfg.confidence, rng=group_rng(cfg.bootstrap_seed, *labels))


def paired_series(a: Series, b: Series) -> Series:
    """a − b on the items (pairs or prompts) both have, seed by seed."""
    out = Series()
    for seed in sorted(set(a.seeds) & set(b.seeds)):
        (ia, va), (ib, vb) = a.seeds[seed], b.seeds[seed]
        common, ja, jb = np.intersect1d(ia, ib, return_indices=True)
        if len(common):
            out.seeds[seed] = (common, va[ja] - vb[jb])
    return out


def ratio_interval(num: Series, den: Series, cfg, *labels: str) -> Optional[dict]:
    """mean(num)/mean(den) — means over seeds of means over the items both have (paired by id) — with the
    hierarchical bootstrap of :func:`roads.metrics.bootstrap_interval` (seeds, then items, numerator and denominator
    drawn together); None when the denominator is not positive."""
    per_seed = []
    for seed in sorted(set(num.seeds) & set(den.seeds)):
        (i_n, v_n), (i_d, v_d) = num.seeds[seed], den.seeds[seed]
        common, jn, jd = np.intersect1d(i_n, i_d, return_indices=True)
        if len(common):
            per_seed.append((np.asarray(v_n, np.float64)[jn].reshape(-1), np.asarray(v_d, np.float64)[jd].reshape(-1)))
    if not per_seed or any(np.isnan(a).any() or np.isnan(b).any() for a, b in per_seed):
        return None
    top = float(np.mean([a.mean() for a, _ in per_seed]))
    bottom = float(np.mean([b.mean() for _, b in per_seed]))
    if not bottom > 1e-12:
        return None
    rng = group_rng(cfg.bootstrap_seed, *labels)
    n_seeds, draws = len(per_seed), cfg.n_bootstrap
    chosen = rng.integers(0, n_seeds, size=(draws, n_seeds))
    nums, dens = np.empty((draws, n_seeds)), np.empty((draws, n_seeds))
    for s, (a, b) in enumerate(per_seed):  # each (replicate, slot) gets its own draw of the seed's items
        index = rng.integers(0, len(a), size=(draws, n_seeds, len(a)))
        mask = chosen == s
        nums[mask], dens[mask] = a[index].mean(-1)[mask], b[index].mean(-1)[mask]
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = nums.mean(1) / dens.mean(1)
    stats = stats[np.isfinite(stats)]
    alpha = (1 - cfg.confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha]) if len(stats) else (np.nan, np.nan)
    return {"mean": round(top / bottom, 6), "lo": round(float(lo), 6), "hi": round(float(hi), 6)}


def column(series: Series, j: int, shift: float = 0.0) -> Series:
    """Column ``j`` of a series, minus ``shift``."""
    out = Series()
    for seed, (ids, values) in series.seeds.items():
        out.seeds[seed] = (ids, values[:, j] - shift)
    return out


def mapped(series: Series, fn: Callable[[np.ndarray], np.ndarray]) -> Series:
    out = Series()
    for seed, (ids, values) in series.seeds.items():
        out.seeds[seed] = (ids, fn(values))
    return out


def seed_mean(values: list) -> Optional[float]:
    """The mean of the numbers among ``values`` (one per seed), or None."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(float(np.mean(values)), 6) if values else None


def cell(point, lo, hi, i: int) -> dict:
    return {"mean": round(float(point[i]), 6), "lo": round(float(lo[i]), 6), "hi": round(float(hi[i]), 6)}


def verifier_meta(data: GapData, task: str, verifier: str) -> dict:
    if verifier == "gold":
        return {"kind": "gold", "parameters": 0, "train_examples": None}
    return data.info[task]["verifiers"].get(verifier, {"kind": "?", "parameters": 0, "train_examples": None})


def canonical(data: GapData, task: str, kind: str) -> Optional[str]:
    """The verifier of a kind that speaks for it in the gap summary: the one trained on the most pairs (the first
    listed on ties) — with learning-curve variants present, the full-data one."""
    entries = [(v, m) for v, m in data.info[task]["verifiers"].items() if m.get("kind") == kind]
    if not entries:
        return None
    return max(entries, key=lambda e: (e[1].get("train_examples") or 0, -list(data.info[task]["verifiers"]).index(e[0])))[0]


# --------------------------------------------------------------------------- tables


def verifier_rows(data: GapData, cfg) -> list[dict]:
    """One row per (task, verifier) on the held-out pairs, the Bayes ceiling (verifier ``gold``) among them where the
    gap outputs carry it. Beside accuracy and log-likelihood: ``accuracy_headroom`` / ``loglik_headroom`` =
    Σ(value − chance)/Σ(ceiling − chance) over the same pairs (chance ½ and log ½; None without a ceiling), and on
    the on-policy pairs ``onpolicy_accuracy`` (agreement with the gold order), ``onpolicy_loglik`` (expected under
    the labels' τ) and ``onpolicy_accuracy_headroom`` (expected accuracy against the expected ceiling)."""
    rows = []
    for (task, verifier), series in data.verifiers.items():
        point, lo, hi = interval(series, cfg, task, "verifier", verifier)
        meta = verifier_meta(data, task, verifier)
        row = {"task": task, "verifier": verifier, "kind": meta["kind"], "parameters": meta.get("parameters"),
               "train_examples": meta.get("train_examples"), "seeds": sorted(series.seeds),
               "accuracy": cell(point, lo, hi, 0), "loglik": cell(point, lo, hi, 1),
               "accuracy_headroom": None, "loglik_headroom": None,
               "onpolicy_accuracy": None, "onpolicy_loglik": None, "onpolicy_accuracy_headroom": None}
        ceiling = data.verifiers.get((task, GOLD))
        if ceiling is not None and verifier != GOLD:
            for j, name, chance in ((0, "accuracy_headroom", CHANCE_ACCURACY), (1, "loglik_headroom", CHANCE_LOGLIK)):
                row[name] = ratio_interval(column(series, j, chance), column(ceiling, j, chance), cfg, task,
                                           "headroom", verifier, name)
        on = data.onpolicy.get((task, verifier))
        if on is not None:
            point, lo, hi = interval(on, cfg, task, "onpolicy", verifier)
            row["onpolicy_accuracy"] = cell(point, lo, hi, 0)
            if all(np.isfinite(v[:, 1:]).all() for _, v in on.seeds.values()):
                row["onpolicy_loglik"] = cell(point, lo, hi, 2)
                row["onpolicy_accuracy_headroom"] = ratio_interval(
                    column(on, 1, CHANCE_ACCURACY), column(on, 3, CHANCE_ACCURACY), cfg, task, "onpolicy-headroom",
                    verifier)
        rows.append(row)
    return rows


def verifier_diffs(data: GapData, cfg) -> list[dict]:
    """Paired differences between the canonical verifiers of two kinds, per task (accuracy and log-likelihood)."""
    out = []
    for task in data.info:
        for ka, kb in VERIFIER_DIFFS:
            a, b = canonical(data, task, ka), canonical(data, task, kb)
            if a is None or b is None or (task, a) not in data.verifiers or (task, b) not in data.verifiers:
                continue
            diff = paired_series(data.verifiers[(task, a)], data.verifiers[(task, b)])
            if not diff.seeds:
                continue
            point, lo, hi = interval(diff, cfg, task, "verifier-diff", a, b)
            out.append({"task": task, "a": a, "b": b, "a_kind": ka, "b_kind": kb, "seeds": sorted(diff.seeds),
                        "accuracy": cell(point, lo, hi, 0), "loglik": cell(point, lo, hi, 1)})
    return out


def bon_rows(data: GapData, cfg) -> list[dict]:
    """One row per (task, policy, verifier): the best-of-N curve, and ``relative_gap`` (Song et al. 2024) =
    Σ(pick at the largest N − a random sample) / the same for the gold reward, over the same prompts (None for the
    gold row and without one)."""
    gain = lambda v: v[:, -1] - v[:, 0]  # noqa: E731
    rows = []
    for (task, policy, verifier), series in data.bon.items():
        point, lo, hi = interval(series, cfg, task, "bon", policy, verifier)
        meta = verifier_meta(data, task, verifier)
        pmeta = data.info[task].get("policies", {}).get(policy, {})
        gold = data.bon.get((task, policy, GOLD))
        relative = None
        if gold is not None and verifier != GOLD:
            relative = ratio_interval(mapped(series, gain), mapped(gold, gain), cfg, task, "relative-gap", policy,
                                      verifier)
        rows.append({"task": task, "policy": policy, "verifier": verifier, "kind": meta["kind"],
                     "verifier_parameters": meta.get("parameters"), "policy_parameters": pmeta.get("parameters"),
                     "ns": data.ns[task], "seeds": sorted(series.seeds),
                     "curve": [cell(point, lo, hi, i) for i in range(len(data.ns[task]))], "relative_gap": relative})
    return rows


def gap_summary(data: GapData, vdiffs: list[dict], brows: list[dict],
                online_effect: Callable[[str], Optional[dict]]) -> list[dict]:
    """One row per task: the loglik gap (global − implicit) with its interval, the verifiers' accuracies, best-of-N
    at the largest N on SFT samples, and the online − offline DPO difference where the run has both policies."""
    out = []
    for task in data.info:
        row: dict = {"task": task, "n_max": data.ns[task][-1]}
        for d in vdiffs:
            if d["task"] == task:
                row[f"loglik_{d['a_kind']}_minus_{d['b_kind']}"] = d["loglik"]
                row[f"accuracy_{d['a_kind']}_minus_{d['b_kind']}"] = d["accuracy"]
        for kind in ("global", "local", "implicit"):
            v = canonical(data, task, kind)
            if v and (task, v) in data.verifiers:
                seeds = data.verifiers[(task, v)].seeds
                row[f"accuracy_{kind}"] = round(float(np.mean([s[1][:, 0].mean() for s in seeds.values()])), 6)
        policy = "sft" if any(r["task"] == task and r["policy"] == "sft" for r in brows) else \
            next((r["policy"] for r in brows if r["task"] == task), None)
        if policy:
            row["bon_policy"] = policy
            curves = {r["verifier"]: r["curve"] for r in brows if r["task"] == task and r["policy"] == policy}
            base = curves.get("gold", next(iter(curves.values())))[0]["mean"]  # N = 1: a random sample
            row["bon_at_1"] = base
            gold_top = curves["gold"][-1]["mean"] if "gold" in curves else None
            relative = {r["verifier"]: r.get("relative_gap") for r in brows
                        if r["task"] == task and r["policy"] == policy}
            for kind in ("gold", "global", "local", "implicit"):
                v = "gold" if kind == "gold" else canonical(data, task, kind)
                if v in curves:
                    row[f"bon_{kind}"] = curves[v][-1]
                    if gold_top is not None and gold_top > base and kind != "gold":
                        row[f"headroom_{kind}"] = round((curves[v][-1]["mean"] - base) / (gold_top - base), 4)
                    if kind != "gold" and relative.get(v) is not None:
                        row[f"relative_gap_{kind}"] = relative[v]
        row.update(validity(data, task))
        effect = online_effect(task)
        if effect is not None:
            row["online_minus_offline"] = effect
        out.append(row)
    return out


def validity(data: GapData, task: str) -> dict:
    """The validity numbers of a task's gap outputs, each the mean over seeds of what ``measure_gap`` wrote (absent
    keys where no seed has them): ``ceiling_*`` (the labels' Bayes ceiling on the held-out pairs: realised accuracy
    and log-likelihood, their expectations over the label noise, tie fraction, τ), ``likelihood_spearman`` /
    ``likelihood_spearman_within`` (ρ of log π_SFT with r*, pooled / mean within prompts) and ``greedy_gold``
    ({policy: mean gold reward of its greedy output})."""
    infos = data.infos.get(task, [])
    out: dict = {}
    for key in ("accuracy", "loglik", "expected_accuracy", "expected_loglik", "tie_fraction", "tau"):
        value = seed_mean([(i.get("ceiling") or {}).get(key) for i in infos])
        if value is not None:
            out[f"ceiling_{key}"] = value
    for key, name in (("pooled", "likelihood_spearman"), ("within_prompt_mean", "likelihood_spearman_within")):
        value = seed_mean([(i.get("likelihood_spearman") or {}).get(key) for i in infos])
        if value is not None:
            out[name] = value
    greedy = {p: seed_mean([(i.get("greedy_gold") or {}).get(p) for i in infos])
              for p in dict.fromkeys(p for i in infos for p in (i.get("greedy_gold") or {}))}
    if greedy:
        out["greedy_gold"] = greedy
    return out


def hypothesis_rows(families: dict[str, str], policy_effect: Callable[[str, str, str], Optional[dict]],
                    vdiffs: list[dict], margin: float) -> list[dict]:
    """One row per hypothesis the run can measure. ``families`` maps a family to the task that stands for it;
    ``policy_effect(task, a, b)`` gives the paired gold-reward difference a − b as {mean, lo, hi}, or None."""
    rows = []
    for h in HYPOTHESES:
        task = families.get(h.family)
        if task is None:
            continue
        if h.kind == "policies":
            effect = policy_effect(task, h.a, h.b)
        else:
            effect = next((d["loglik"] for d in vdiffs if d["task"] == task and d["a_kind"] == h.a
                           and d["b_kind"] == h.b), None)
        if effect is None:
            continue
        rows.append({"id": h.id, "claim": h.claim, "experiment": h.experiment, "task": task, "effect": h.effect,
                     "predicted": h.predicted, **effect,
                     "verdict": verdict(effect["lo"], effect["hi"], h.predicted, margin)})
    return rows


# --------------------------------------------------------------------------- writing


def _fmt(c: Optional[dict]) -> str:
    return "–" if c is None else f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _size(n) -> str:
    return "–" if not n else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


Curves = dict[tuple[str, str], list[tuple[int, dict]]]


def learning_curves(vrows: list[dict], policy_points: list[dict], series: dict[str, str]) -> tuple[Curves, Curves]:
    """(verifier curves, policy curves): (task, series) -> [(training pairs, accuracy or gold reward cell)], for the
    series with at least two different numbers of pairs. ``series``: entry -> its series, as the variants declare it
    (``report.series``); an entry not in it is a series of its own."""
    vcurves: Curves = {}
    for r in vrows:
        if r["train_examples"]:
            vcurves.setdefault((r["task"], series.get(r["verifier"], r["verifier"])), []).append((r["train_examples"], r["accuracy"]))
    pcurves: Curves = {}
    for r in policy_points:
        pcurves.setdefault((r["task"], series.get(r["policy"], r["policy"])), []).append((r["train_examples"], r["gold"]))
    pick = lambda curves: {k: sorted(v, key=lambda e: e[0]) for k, v in curves.items()  # noqa: E731
                           if len({e[0] for e in v}) > 1}
    return pick(vcurves), pick(pcurves)


def write_gap_markdown(path: Path, summary: list[dict], vrows: list[dict], vdiffs: list[dict], brows: list[dict],
                       cfg, policy_points: list[dict] = ()) -> None:
    pct = f"{100 * cfg.confidence:g}%"
    lines = [
        "# The generation–verification gap",
        "",
        "**gap** = held-out preference log-likelihood of the global reward model − that of the DPO implicit reward "
        "(both fitted to the same pairs), paired by validation pair. Positive: a separate verifier explains the "
        "preferences better than the generator's own likelihood ratio. **headroom** = (best-of-N with the verifier − "
        "a random sample) / (best-of-N with the gold reward − a random sample), at the largest N, on SFT samples. "
        f"Intervals: {pct} hierarchical bootstrap (seeds, then pairs or prompts; {cfg.n_bootstrap} resamples).",
        "",
        "## Summary per task",
        "",
        "| task | gap (global − implicit loglik) | global − local loglik | acc global / local / implicit | "
        "headroom global / local / implicit | online − offline DPO (gold) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        acc = " / ".join(f"{r[f'accuracy_{k}']:.3f}" if f"accuracy_{k}" in r else "–"
                         for k in ("global", "local", "implicit"))
        head = " / ".join(f"{r[f'headroom_{k}']:.2f}" if f"headroom_{k}" in r else "–"
                          for k in ("global", "local", "implicit"))
        lines.append(f"| {r['task']} | {_fmt(r.get('loglik_global_minus_implicit'))} | "
                     f"{_fmt(r.get('loglik_global_minus_local'))} | {acc} | {head} | "
                     f"{_fmt(r.get('online_minus_offline'))} |")
    valid = [r for r in summary if any(k.startswith(("ceiling_", "likelihood_spearman", "greedy_gold",
                                                      "relative_gap_")) for k in r)]
    if valid:
        lines += ["", "## Validity per task", "",
                  "**ceiling** = the gold reward r*/τ as a verifier on the held-out pairs (the labels' Bayes ceiling): "
                  "realised (expected over the label noise). **ρ(log π_SFT, r*)** = Spearman correlation of the SFT "
                  "policy's log-likelihood with the gold reward on its own samples, pooled / mean within prompts: "
                  "near 1, the generator's likelihood already carries the reward (no gap to measure). **greedy gold** "
                  "= each policy's greedy output. **relative gap** (Song et al. 2024) = the best-of-N headroom above, "
                  "with its interval.",
                  "", "| task | τ | ties | ceiling accuracy | ceiling log-lik | ρ(log π_SFT, r*) pooled / within | "
                  "greedy gold | relative gap global / local / implicit |", "|---|---|---|---|---|---|---|---|"]
        num = lambda r, k, f=".3f": "–" if r.get(k) is None else format(r[k], f)  # noqa: E731
        for r in valid:
            greedy = ", ".join(f"{p} {v:.3f}" for p, v in (r.get("greedy_gold") or {}).items() if v is not None)
            rel = " / ".join(_fmt(r.get(f"relative_gap_{k}")) for k in ("global", "local", "implicit"))
            lines.append(f"| {r['task']} | {num(r, 'ceiling_tau', 'g')} | {num(r, 'ceiling_tie_fraction')} | "
                         f"{num(r, 'ceiling_accuracy')} ({num(r, 'ceiling_expected_accuracy')}) | "
                         f"{num(r, 'ceiling_loglik')} ({num(r, 'ceiling_expected_loglik')}) | "
                         f"{num(r, 'likelihood_spearman')} / {num(r, 'likelihood_spearman_within')} | "
                         f"{greedy or '–'} | {rel} |")
    lines += ["", "## Verifiers on held-out pairs", "",
              "**headroom** = (value − chance) / (Bayes ceiling − chance) on the same pairs (chance: accuracy ½, "
              "log-likelihood log ½; the ceiling is the row `gold`). **on-policy** = on pairs of the first policy's "
              "own samples ordered by r*: accuracy = agreement with the gold order; its headroom = the accuracy "
              "expected under the labels' τ against the expected ceiling.", "",
              "| task | verifier | kind | params | train pairs | accuracy | log-likelihood | accuracy headroom | "
              "log-lik headroom | on-policy accuracy | on-policy headroom |", "|---|---|---|---|---:|---|---|---|---|---|---|"]
    for r in vrows:
        name = f"{r['verifier']} (Bayes ceiling)" if r["kind"] == "gold" else r["verifier"]
        lines.append(f"| {r['task']} | {name} | {r['kind']} | {_size(r['parameters'])} | "
                     f"{r['train_examples'] if r['train_examples'] is not None else '–'} | {_fmt(r['accuracy'])} | "
                     f"{_fmt(r['loglik'])} | {_fmt(r.get('accuracy_headroom'))} | {_fmt(r.get('loglik_headroom'))} | "
                     f"{_fmt(r.get('onpolicy_accuracy'))} | {_fmt(r.get('onpolicy_accuracy_headroom'))} |")
    if vdiffs:
        lines += ["", "## Paired verifier differences", "", "| task | a − b | accuracy | log-likelihood |",
                  "|---|---|---|---|"]
        for d in vdiffs:
            lines.append(f"| {d['task']} | {d['a']} − {d['b']} | {_fmt(d['accuracy'])} | {_fmt(d['loglik'])} |")
    if brows:
        lines += ["", "## Best-of-N (gold reward of the pick)", ""]
        for task in dict.fromkeys(r["task"] for r in brows):
            rows = [r for r in brows if r["task"] == task]
            ns = rows[0]["ns"]
            lines += [f"### {task}", "", "| policy | verifier | " + " | ".join(f"N={n}" for n in ns) + " |",
                      "|---|---|" + "---|" * len(ns)]
            for r in rows:
                lines.append(f"| {r['policy']} ({_size(r['policy_parameters'])}) | {r['verifier']} "
                             f"({_size(r['verifier_parameters'])}) | "
                             + " | ".join(f"{c['mean']:.3f}" for c in r["curve"]) + " |")
            lines.append("")
    vcurves, pcurves = learning_curves(vrows, list(policy_points), cfg.series)
    if vcurves or pcurves:
        lines += ["## Learning curves (against the number of training pairs)", "",
                  "| task | curve | measure | training pairs: value [lo, hi] |", "|---|---|---|---|"]
        for curves, measure in ((vcurves, "held-out accuracy"), (pcurves, "gold reward")):
            for (task, name), pts in curves.items():
                lines.append(f"| {task} | {name} | {measure} | "
                             + "; ".join(f"{n}: {_fmt(c)}" for n, c in pts) + " |")
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_hypotheses(out_dir: Path, rows: list[dict], cfg) -> None:
    lines = [
        "# Hypotheses: why might online (two-stage) beat offline (one-stage)?",
        "",
        "Each row: the effect that tests the hypothesis, its "
        f"{100 * cfg.confidence:g}% bootstrap interval, what the hypothesis predicts, and the verdict by the rule in "
        f"`roads/hypotheses.py` (margin m = {cfg.equivalence_margin:g}): predicted + → supported if lo > 0, refuted "
        "if hi < m; predicted 0 → supported if the interval lies within ±m, refuted if it excludes 0; otherwise "
        "inconclusive. Before any of these: a hypothesis whose controls failed (the report's validity section) is "
        "**not testable**, and the failed checks are named.",
        "",
        "| | hypothesis | experiment | effect | measured [lo, hi] | predicted | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['id']} | {r['claim']} | {r['experiment']} | {r['effect']} | "
                     f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['predicted']} | **{r['verdict']}** |")
    if not rows:
        lines.append("| – | no hypothesis is measurable from this run's policies | | | | | |")
    (out_dir / "hypotheses.md").write_text("\n".join(lines) + "\n")
    with open(out_dir / "hypotheses.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        keys = ["id", "task", "effect", "mean", "lo", "hi", "predicted", "verdict", "claim", "experiment"]
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] for k in keys])


def write_gap_plots(out_dir: Path, summary: list[dict], vrows: list[dict], brows: list[dict],
                    policy_points: list[dict], series: dict[str, str]) -> list[str]:
    """best_of_n.png, gap_vs_online.png, and learning_curves.png / scale.png when the run varies pairs / sizes.
    Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = list(dict.fromkeys(r["task"] for r in brows))
    if brows:
        policies = list(dict.fromkeys(r["policy"] for r in brows))
        fig, axes = plt.subplots(len(tasks), len(policies), figsize=(4.2 * len(policies), 3.4 * len(tasks)),
                                 squeeze=False)
        for i, task in enumerate(tasks):
            for j, policy in enumerate(policies):
                ax = axes[i][j]
                rows = [r for r in brows if r["task"] == task and r["policy"] == policy]
                for r in sorted(rows, key=lambda r: KIND_ORDER.index(r["kind"]) if r["kind"] in KIND_ORDER else 9):
                    mean = [c["mean"] for c in r["curve"]]
                    ax.plot(r["ns"], mean, marker="o", markersize=3, label=r["verifier"],
                            linestyle="--" if r["kind"] == "gold" else "-", color="black" if r["kind"] == "gold" else None)
                    ax.fill_between(r["ns"], [c["lo"] for c in r["curve"]], [c["hi"] for c in r["curve"]], alpha=0.15)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{task}: samples of {policy}", fontsize=9)
                ax.set_xlabel("N")
                ax.set_ylabel("gold reward of the pick")
                if rows:
                    ax.legend(fontsize=7)
        fig.suptitle("Best-of-N: the gold reward of the sample each verifier picks among N")
        written.append(save_figure(fig, out_dir / "best_of_n.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [r for r in summary if "loglik_global_minus_implicit" in r]
    for k, r in enumerate(pts):
        g = r["loglik_global_minus_implicit"]
        xerr = [[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]]
        if "online_minus_offline" in r:
            o = r["online_minus_offline"]
            ax.errorbar([g["mean"]], [o["mean"]], xerr=xerr, yerr=[[o["mean"] - o["lo"]], [o["hi"] - o["mean"]]],
                        fmt="o", capsize=3, color=f"C{k % 10}", label=r["task"])
        else:
            ax.errorbar([g["mean"]], [0.0], xerr=xerr, fmt="x", capsize=3, color=f"C{k % 10}",
                        label=f"{r['task']} (no online policy)")
    ax.axhline(0, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("gap: loglik(global RM) − loglik(DPO implicit) on held-out pairs")
    ax.set_ylabel("online − offline DPO (gold reward)")
    ax.set_title("Does the measured gap predict the online advantage?")
    if pts:
        ax.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / "gap_vs_online.png"))

    # learning curves: verifiers (accuracy) and policies (gold reward) against the pairs they were trained on
    vcurves, pcurves = learning_curves(vrows, policy_points, series)
    if vcurves or pcurves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, curves, ylabel, title in ((axes[0], vcurves, "held-out accuracy", "Verifiers"),
                                          (axes[1], pcurves, "gold reward", "Policies")):
            for (task, kind), pts_ in curves.items():
                xs = [e[0] for e in pts_]
                ax.errorbar(xs, [e[1]["mean"] for e in pts_],
                            yerr=[[e[1]["mean"] - e[1]["lo"] for e in pts_], [e[1]["hi"] - e[1]["mean"] for e in pts_]],
                            marker="o", capsize=3, label=f"{task}: {kind}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("training pairs")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} against the number of preference pairs", fontsize=10)
            if curves:
                ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / "learning_curves.png"))

    # scale: best-of-N at the largest N with global reward models of several sizes on policies of several sizes
    scale = [r for r in brows if r["kind"] == "global"]
    sizes = {(r["task"], r["policy_parameters"], r["verifier_parameters"]) for r in scale}
    if len({(t, p) for t, p, _ in sizes}) > len(tasks) or len({(t, v) for t, _, v in sizes}) > len(tasks):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for k, (task, policy) in enumerate(dict.fromkeys((r["task"], r["policy"]) for r in scale)):
            rows = sorted((r for r in scale if r["task"] == task and r["policy"] == policy),
                          key=lambda r: r["verifier_parameters"] or 0)
            top = [r["curve"][-1] for r in rows]
            ax.errorbar([r["verifier_parameters"] for r in rows], [c["mean"] for c in top],
                        yerr=[[c["mean"] - c["lo"] for c in top], [c["hi"] - c["mean"] for c in top]], marker="o",
                        capsize=3, label=f"{task}: policy {policy} ({_size(rows[0]['policy_parameters'])})")
        ax.set_xscale("log")
        ax.set_xlabel("reward model parameters")
        ax.set_ylabel("best-of-N gold reward (largest N)")
        ax.set_title("Verifier size against policy size")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / "scale.png"))
    return written

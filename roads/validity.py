"""The study's validity checks: could this run have detected the effect it looks for? Computed before any road is
compared, per task, each with its measured value, its pre-registered threshold (``report.validity`` in
``pipelines.yaml``, the same for every policy) and pass / fail. A hypothesis whose controls fail is **not
testable**, never refuted (``roads.hypotheses.gated_verdict``).

The checks, per task (``gates``: the kinds of hypothesis a failure makes untestable):

``sft_converged``         SFT's epochs chosen by held-out NLL and the curve turned up before the last epoch (or
                          flattened: the last epoch improved it by less than ``sft_min_improvement``), every seed.
                          (policies)
``control:<policy>``      each positive control (``controls``: the gold-oracle online and offline arms) beats the
                          reference (SFT) in gold reward with a paired interval above ``min_control_effect``. If the
                          roads' optimisers cannot use a perfect signal, no comparison of them means anything.
                          (policies)
``displacement:<policy>`` a gold-free check: the log-likelihood of the chosen responses of the policy's own
                          training pairs (the offline pairs; for online DPO the pairs it sampled) does not fall by
                          more than ``max_chosen_logp_fall`` nats (mean over seeds) — DPO's likelihood displacement.
                          (The change on the held-out *offline* pairs, ``val_chosen_logp_change``, is reported by
                          evaluate too; it is not the check, because an online policy rightly leaves the behaviour
                          policy's distribution.) (policies)
``resolution``            the primary contrast's (``report.contrast`` − ``report.baseline``) interval half-width —
                          the minimum detectable effect — is at most ``max_half_width``. (policies)
``labels_informative``    the labels' Bayes ceiling (the gold reward as a verifier on the held-out pairs) is above
                          chance by at least ``min_ceiling_headroom`` in accuracy. (verifiers)
``verifier_headroom``     the global reward model's held-out accuracy as a fraction of the headroom between
                          chance and the ceiling, at least ``min_verifier_headroom`` on gap-class tasks (reported on
                          all, with the log-likelihood fraction beside it — not the threshold, because an untuned
                          reward model's log-likelihood measures its scale as much as its ranking). (gap)
``likelihood_spearman``   Spearman(log π_SFT, r*) on SFT's samples: on a gap-class task at most
                          ``max_likelihood_spearman`` (the policy's own likelihood must not already express the
                          reward — else the paper's theory predicts offline = online). Reported on all. (gap)
``greedy_sft``            greedy SFT's gold reward: on a gap-class task at most ``max_greedy_gold`` (SFT's greedy
                          output is not already optimal, so the arms measure more than sharpening). (gap)

``gap`` checks gate the hypotheses that need a generation–verification gap in the gap family (H6's controls are
compared against it). A check whose inputs the run lacks (a control not in the pipeline, no measure_gap) fails with
"not run": a study cannot claim what it did not check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from typing import Callable, Optional

from roads.artifacts import read_json

# the class of each synthetic family: where its generation–verification gap is (roads/data/synthetic.py)
GAP_CLASSES = {"shuffle": "gap", "star": "gap", "gap": "gap", "short": "closed (generation)", "hidden": "closed (verification)",
               "constraints": "gap", "rouge": "closed (verification)"}  # the last two: English text (roads/data/text.py)


def gap_class(family: Optional[str]) -> Optional[str]:
    """The class of a task's family: a built-in's from :data:`GAP_CLASSES`, a user family's (``package.module:Class``)
    its ``gap_class`` (``roads.data.family.gap_class_of``); None when unknown (real data, or the class is gone)."""
    if not family:
        return None
    if family in GAP_CLASSES:
        return GAP_CLASSES[family]
    from roads.data.family import gap_class_of, is_path

    return gap_class_of(family) if is_path(family) else None


@dataclass(frozen=True)
class Check:
    task: str
    name: str
    value: str  # the measured value, formatted
    threshold: str
    passed: bool
    gates: str  # "policies", "verifiers" or "gap"
    detail: str = ""

    def row(self) -> dict:
        return asdict(self)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return fmean(values) if values else None


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "not run" if value is None else f"{value:.{digits}f}"


def _spearman(info: dict) -> Optional[float]:
    s = info.get("likelihood_spearman")
    if isinstance(s, dict):
        s = s.get("pooled", s.get("value"))
    return None if s is None else float(s)


def _ceiling(info: dict) -> dict:
    return info.get("ceiling") or {}


def checks(tasks: list[str], classes: dict[str, str], evaluate_info: dict[tuple[str, str], list[dict]],
           gap_infos: dict[str, list[dict]], effect: Callable[[str, str, str], Optional[dict]], cfg) -> list[Check]:
    """The checks of every task. ``evaluate_info[(task, policy)]``: each seed's evaluate ``metrics.json``;
    ``gap_infos[task]``: each seed's ``gap.json``; ``effect(task, a, b)``: paired gold difference {mean, lo, hi};
    ``cfg``: the ReportConfig (``cfg.validity`` holds the thresholds)."""
    v = cfg.validity
    out: list[Check] = []
    for task in tasks:
        gap_class = classes.get(task) == "gap"
        has_gold = any("gold_reward_mean" in i for (t, _), infos in evaluate_info.items() if t == task for i in infos)
        # SFT converged
        selections = [i.get("selection") for i in evaluate_info.get((task, v.reference), [])]
        if not selections or any(s is None or not s.get("candidates") for s in selections):
            out.append(Check(task, "sft_converged", "not run", "held-out NLL turned up or flat (Δ < "
                             f"{v.sft_min_improvement:g})", False, "policies",
                             f"evaluate[{v.reference}] has no selection.json (sft.select=val_nll records it)"))
        else:
            ok, parts = True, []
            for s in selections:
                vals, cands = s["values"], s["candidates"]
                turned = s["selected"] != cands[-1]
                flat = len(vals) >= 2 and (vals[-2] - vals[-1]) / abs(vals[-2]) < v.sft_min_improvement
                ok &= turned or flat
                parts.append(f"{s['selected']:g}/{cands[-1]:g}")
            best = _mean(min(s["values"]) for s in selections)
            out.append(Check(task, "sft_converged", f"epochs {', '.join(parts)}; held-out NLL {best:.4f}",
                             f"held-out NLL turned up or flat (Δ < {v.sft_min_improvement:g})", ok, "policies"))
        # positive controls
        if has_gold:
            for control in v.controls:
                e = effect(task, control, v.reference)
                value = "not run" if e is None else f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"
                out.append(Check(task, f"control:{control}", value,
                                 f"{control} − {v.reference} interval > {v.min_control_effect:g}",
                                 e is not None and e["lo"] > v.min_control_effect, "policies"))
        # displacement (gold-free)
        for policy in v.displacement:
            infos = evaluate_info.get((task, policy), [])
            change = _mean(i.get("train_chosen_logp_change") for i in infos)
            out.append(Check(task, f"displacement:{policy}", "not run" if change is None else f"{change:+.3f} nats",
                             "its training pairs' chosen log-lik change ≥ "
                             + (f"−{v.max_chosen_logp_fall:g}" if v.max_chosen_logp_fall else "0"),
                             change is not None and change >= -v.max_chosen_logp_fall, "policies"))
        # resolution of the primary contrast
        if has_gold:
            e = effect(task, cfg.contrast, cfg.baseline)
            half = None if e is None else (e["hi"] - e["lo"]) / 2
            out.append(Check(task, "resolution", "not run" if half is None else f"±{half:.3f}",
                             f"{cfg.contrast} − {cfg.baseline} half-width ≤ {v.max_half_width:g}",
                             half is not None and half <= v.max_half_width, "policies"))
        # the labels and the verifiers (measure_gap)
        infos = gap_infos.get(task, [])
        if has_gold:
            acc = _mean(_ceiling(i).get("accuracy") for i in infos)
            ll = _mean(_ceiling(i).get("loglik") for i in infos)
            out.append(Check(task, "labels_informative",
                             "not run" if acc is None else f"ceiling accuracy {acc:.3f}, log-lik {ll:.3f}",
                             f"ceiling accuracy ≥ 0.5 + {v.min_ceiling_headroom:g}",
                             acc is not None and acc >= 0.5 + v.min_ceiling_headroom, "verifiers"))
            rm = [i.get("verifiers", {}).get(v.verifier, {}) for i in infos]
            acc_h = _mean(r.get("val_accuracy_headroom") for r in rm)
            ll_h = _mean(r.get("val_loglik_headroom") for r in rm)
            onp = _mean(r.get("onpolicy_accuracy") for r in rm)
            value = ("not run" if acc_h is None else f"accuracy {acc_h:.2f}, log-lik {ll_h:.2f} of the headroom"
                     + ("" if onp is None else f"; on-policy accuracy {onp:.3f}"))
            out.append(Check(task, "verifier_headroom", value,
                             f"{v.verifier} accuracy ≥ {v.min_verifier_headroom:g} of the headroom"
                             + ("" if gap_class else " (gap class only)"),
                             (acc_h is not None and acc_h >= v.min_verifier_headroom) or not gap_class, "gap"))
            rho = _mean(_spearman(i) for i in infos)
            out.append(Check(task, "likelihood_spearman", _fmt(rho),
                             f"≤ {v.max_likelihood_spearman:g}" + ("" if gap_class else " (gap class only)"),
                             (rho is not None and rho <= v.max_likelihood_spearman) or not gap_class, "gap"))
            greedy = _mean((i.get("greedy_gold") or {}).get(v.reference) for i in infos)
            out.append(Check(task, "greedy_sft", _fmt(greedy),
                             f"≤ {v.max_greedy_gold:g}" + ("" if gap_class else " (gap class only)"),
                             (greedy is not None and greedy <= v.max_greedy_gold) or not gap_class, "gap"))
    return out


def failed(checks_: list[Check], task: str, gates: tuple[str, ...]) -> list[str]:
    """The names of the failed checks of ``task`` that gate any of ``gates``."""
    return [c.name for c in checks_ if c.task == task and c.gates in gates and not c.passed]


def evaluate_infos(folders: dict[str, Path]) -> dict[tuple[str, str], list[dict]]:
    """(task, policy) -> each seed's evaluate ``metrics.json``."""
    out: dict[tuple[str, str], list[dict]] = {}
    for folder in folders.values():
        info = read_json(Path(folder) / "metrics.json")
        out.setdefault((str(info["task"]), str(info["policy"])), []).append(info)
    return out


def gap_infos(folders: dict[str, Path]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for folder in folders.values():
        info = read_json(Path(folder) / "gap.json")
        out.setdefault(str(info["task"]), []).append(info)
    return out


def write_markdown(checks_: list[Check], classes: dict[str, str],
                   families: Optional[dict[str, str]] = None) -> list[str]:
    """The validity section's lines (the report opens with them). ``families``: task -> its family (a built-in's
    name, or a user family's path ``package.module:Class``), listed above the table."""
    lines = ["## Validity: could this run detect the effect?", "",
             "Each check's threshold is pre-registered in `pipelines.yaml` (`report.validity`), the same for every "
             "policy. A hypothesis whose controls fail is *not testable*.", ""]
    if families:
        lines += ["Tasks: " + "; ".join(f"`{task}`: family `{family}`, class {classes.get(task, '–')}"
                                        for task, family in families.items()) + ".", ""]
    lines += ["| task | class | check | value | threshold | result |", "|---|---|---|---|---|---|"]
    for c in checks_:
        lines.append(f"| {c.task} | {classes.get(c.task, '–')} | {c.name} | {c.value} | {c.threshold} | "
                     f"{'pass' if c.passed else '**FAIL**'}{' — ' + c.detail if c.detail else ''} |")
    n_fail = sum(not c.passed for c in checks_)
    lines += ["", f"{len(checks_) - n_fail} of {len(checks_)} checks pass." if checks_ else "No checks (no tasks)."]
    return lines


def selection_lines(evaluate_info: dict[tuple[str, str], list[dict]], select_folders: dict[str, Path], cfg,
                    gap_infos_: dict[str, list[dict]] | None = None) -> list[str]:
    """The report's "chosen by rule" section: SFT's epochs by held-out NLL (the curve), and each select_dpo
    output's candidates, criterion, guards and choice — per task and seed."""
    lines: list[str] = []
    sft = sorted(((t, i) for (t, p), infos in evaluate_info.items() if p == cfg.validity.reference for i in infos
                  if i.get("selection")), key=lambda x: (x[0], x[1]["seed"]))
    if sft:
        lines += ["",
                  f"**{cfg.validity.reference} epochs**: the epoch with the lowest held-out NLL (per completion token, "
                  "on `sft_val.jsonl`).", "", "| task | seed | chosen | held-out NLL by epoch |", "|---|---:|---:|---|"]
        for task, info in sft:
            s = info["selection"]
            curve = ", ".join(f"{e:g}: {v:.3f}" for e, v in zip(s["candidates"], s["values"]))
            lines.append(f"| {task} | {info['seed']} | {s['selected']:g} | {curve} |")
    rms = sorted(((t, i["seed"], e, v["selection"]) for t, infos in (gap_infos_ or {}).items() for i in infos
                  for e, v in i.get("verifiers", {}).items() if v.get("selection")), key=lambda x: x[:3])
    if rms:
        lines += ["", "**Reward-model learning rate**: the candidate with the best held-out accuracy on "
                  "`pairs_select.jsonl` (log-likelihood breaks ties).", "",
                  "| task | seed | verifier | candidates (lr: accuracy) | chosen |", "|---|---:|---|---|---:|"]
        for task, seed, entry, sel in rms:
            cands = ", ".join(f"{c['lr']:g}: {c['select_accuracy']:.3f}" for c in sel["candidates"])
            lines.append(f"| {task} | {seed} | {entry} | {cands} | {sel['selected']:g} |")
    docs = []
    for folder in select_folders.values():
        doc = read_json(Path(folder) / "dpo_selection.json")
        meta = read_json(Path(folder) / "select.json") if (Path(folder) / "select.json").is_file() else {}
        docs.append((meta.get("task", "?"), meta.get("seed", 0), doc))
    if docs:
        g = docs[0][2]["guards"]
        lines += ["", "**DPO settings of both roads** (`select_dpo`): the highest held-out implicit-reward "
                  f"accuracy on `pairs_select.jsonl` (log-likelihood breaks ties) among the candidates whose held-out "
                  f"chosen log-likelihood falls by at most {g['max_chosen_logp_fall']:g} nats and whose KL to SFT is "
                  f"at most {g['max_kl']:g} nats.", "",
                  "| task | seed | β | loss | lr | held-out accuracy | log-lik | chosen log-lik change | KL | guards "
                  "| chosen |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for task, seed, doc in sorted(docs, key=lambda x: (x[0], x[1])):
            for c in doc["candidates"]:
                pick = all(c[k] == doc["selected"][k] for k in ("beta", "loss_type", "lr"))
                lines.append(f"| {task} | {seed} | {c['beta']:g} | {c['loss_type']} | {c['lr']:g} | "
                             f"{c['val_accuracy']:.3f} | {c['val_loglik']:.4f} | {c['chosen_logp_change']:+.3f} | "
                             f"{c['kl']:.3f} | "
                             f"{'pass' if c['passed'] else 'fail'} | {'**chosen**' if pick else ''} |")
    if lines:
        lines = ["", "## Settings chosen by rule (never by the gold reward)", *lines]
    return lines

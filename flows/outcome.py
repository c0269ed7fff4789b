"""What a study run comes to, without Prefect: the rows of the summary table, the budget per policy, the node table,
and the outcome dict that ``roads run`` prints — shared by the flow and by a fully cached rerun, which is decided
and recorded before Prefect is imported (see ``flows/study.py::run_study``)."""

from __future__ import annotations

from statistics import fmean
from typing import Any

from roads.errors import RoadsError
from roads.plan import Node, downstream
from roads.stage_table import GOLD_METRICS, POLICY_METRICS, STAGES


class StudyFailed(RoadsError):
    """Some stage failed; the outcome (what ran, what was cached, what failed) is attached."""

    def __init__(self, message: str, outcome: dict, exit_code: int = 1):
        super().__init__(message)
        self.outcome = outcome
        self.exit_code = exit_code


class Failure(str):
    """A node's failure as the node table shows it (one line), with the exit code of the error behind it: the study
    exits with its first failure's own code (2 for bad input, 1 for training that went wrong)."""

    exit_code = 1

    @classmethod
    def of(cls, err: BaseException | str) -> "Failure":
        failure = cls(err if isinstance(err, str) else one_line(err))
        failure.exit_code = getattr(err, "exit_code", 1)
        return failure


def first_failure(failed: dict[str, str]) -> tuple[str, str]:
    """The failure that caused the others (a dependent's "skipped: … failed" is not one)."""
    roots = [(node, why) for node, why in failed.items() if not why.startswith("skipped: ")]
    return (roots or list(failed.items()))[0]


def study_failed(what: str, failed: dict[str, str], total: int, outcome: dict) -> StudyFailed:
    """The error of a study (or sweep) with failed stages: how many, the first cause, its exit code."""
    node, why = first_failure(failed)
    skipped = sum(reason.startswith("skipped: ") for reason in failed.values())
    after = f" ({skipped} more skipped after them)" if skipped else ""
    return StudyFailed(f"{len(failed) - skipped} of {total} {what} failed{after}; first: {node}: {why}", outcome,
                       getattr(why, "exit_code", 1))


def one_line(err: BaseException) -> str:
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(err, BrokenProcessPool):  # the worker was killed under the stage; nothing in it could say why
        return ("a worker process died under the stage (BrokenProcessPool), most often killed for memory (`dmesg` "
                "says): lower the stage's batch_size or max_length, or run fewer stages at once (--workers 1)")
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}" if not isinstance(err, RoadsError) else text[0]


def summarize(nodes: list[Node], results: dict[str, dict]) -> list[dict]:
    """One row per evaluated (task, seed, policy)."""
    rows = []
    for node in nodes:
        if STAGES[node.stage].per_policy and node.id in results:
            metrics = results[node.id]["metrics"]
            row = {"task": node.spec.task_name, "seed": node.spec.seed, "policy": node.spec.policy}
            row.update({k: metrics.get(f"{node.stage}/{k}") for k in POLICY_METRICS})
            rows.append(row)
    return rows


def present_metrics(rows: list[dict]) -> tuple[str, ...]:
    """The per-policy metrics some row has (POLICY_METRICS' order): the gold columns for gold-reward tasks, KL, length,
    finished rate for every task, the proxy win rate where a held-out judge scored the samples; the gold columns
    when there are no rows."""
    found = tuple(m for m in POLICY_METRICS if any(r.get(m) is not None for r in rows))
    return found or GOLD_METRICS


def policies_by_task(rows: list[dict], metrics: tuple[str, ...] = GOLD_METRICS) -> list[dict]:
    """Mean over seeds of each metric, one row per (task, policy), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["policy"]), []).append(row)
    out = []
    for (task, policy), group in groups.items():
        entry: dict[str, Any] = {"task": task, "policy": policy, "seeds": len(group)}
        for m in metrics:
            values = [r[m] for r in group if r.get(m) is not None]
            entry[m] = fmean(values) if values else None
        out.append(entry)
    return out


BUDGET_COLUMNS = ("task", "policy", "seeds", "tokens_trained", "tokens_generated", "wall_seconds")


def budget(nodes: list[Node], results: dict[str, dict]) -> list[dict]:
    """What each evaluated policy cost, counting every stage it stands on (the reward model for online policies, the
    offline-DPO policy for online DPO from DPO, …): tokens trained on, tokens generated, and the wall time of the
    runs that produced the results (a cache hit costs what it cost when it ran). Mean over seeds."""
    by_id = {n.id: n for n in nodes}
    per_policy: dict[tuple[str, str], list[dict]] = {}
    for node in nodes:
        if node.stage != "evaluate" or node.id not in results:
            continue
        todo, seen = [node.inputs["policy"]], set()
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(by_id[current].inputs.values())
        cost = {"tokens_trained": 0.0, "tokens_generated": 0.0, "wall_seconds": 0.0}
        for dep in seen:
            result = results.get(dep, {})
            for key, value in result.get("metrics", {}).items():
                if key.endswith("/num_tokens"):
                    cost["tokens_trained"] += value
                elif key.endswith("/tokens_generated"):
                    cost["tokens_generated"] += value
            cost["wall_seconds"] += float(result.get("wall_seconds", 0.0))
        per_policy.setdefault((node.spec.task_name, node.spec.policy), []).append(cost)
    return [{"task": task, "policy": policy, "seeds": len(costs),
             "tokens_trained": int(fmean(c["tokens_trained"] for c in costs)),
             "tokens_generated": int(fmean(c["tokens_generated"] for c in costs)),
             "wall_seconds": round(fmean(c["wall_seconds"] for c in costs), 1)} for (task, policy), costs in per_policy.items()]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def select(nodes: list[Node], stage: str | None) -> list[Node]:
    """``stage`` None: every node. Otherwise that stage's nodes, what depends on them, and everything those need
    (online DPO from offline DPO depends on the reward model and needs offline DPO too)."""
    if stage is None:
        return nodes
    by_id = {n.id: n for n in nodes}
    keep: set[str] = set()
    todo = list(downstream(nodes, stage))
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo.extend(by_id[node_id].inputs.values())
    return [n for n in nodes if n.id in keep]




def outcome_of(pipeline: str, nodes: list[Node], results: dict[str, dict], report: list[dict], tracker) -> dict:
    """The outcome dict, and the parent run's summary, budget, report metrics and tables (``tracker.finish``)."""
    rows = summarize(nodes, results)
    spent = budget(nodes, results)
    errors = {row["node"]: row["error"] for row in report if row["cache"] == "failed"}
    outcome = {"pipeline": pipeline, "parent_run_id": tracker.parent_id, "experiment_id": tracker.experiment_id,
               "nodes": report, "summary": rows, "budget": spent,
               "report": results["report"]["artifact"]["path"] if "report" in results else None,
               "report_files": results.get("report", {}).get("files", [])}
    shown = present_metrics(rows)
    table = markdown_table(policies_by_task(rows, shown), ["task", "policy", "seeds", *shown])
    files = {"summary.md": table + "\n", "nodes.md": markdown_table(report, NODE_COLUMNS) + "\n",
             "budget.md": markdown_table(spent, list(BUDGET_COLUMNS)) + "\n"}
    tracker.finish("FAILED" if errors else "FINISHED", rows, files,
                   error=": ".join(first_failure(errors)) if errors else "", budget_rows=spent,
                   report_folder=outcome["report"], report_files=outcome["report_files"],
                   report_metrics=results.get("report", {}).get("metrics"), results=results)
    return outcome


NODE_COLUMNS = ["node", "cache", "seconds", "produced_by", "error"]


def node_row(node: Node, cache: str, result: dict | None = None, error: str = "") -> dict:
    """A row of the node table: hit / miss / failed, the seconds it took (misses), the MLflow run that computed it."""
    result = result or {}
    return {"node": node.id, "stage": node.stage, "inputs": sorted(node.inputs.values()), "cache": cache,
            "seconds": result.get("wall_seconds") if cache == "miss" else None,
            "produced_by": result.get("produced_by") or "", "error": error,
            "digest": result.get("artifact", {}).get("digest", "")}

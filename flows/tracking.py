"""MLflow conventions: one experiment per pipeline, a parent run per flow run, a nested child run per stage node.

Child runs are created by the flow before their tasks start (so a task can log per-step metrics into its own child
by run id) and finished by the flow afterwards — also for cache hits, so two pipeline runs compare side by side.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.cleanup import owner, owner_alive
from roads.config import Study, flatten, load_study_file
from roads.plan import Node
from roads.settings import ModelConfig
from roads.stage_table import LORA_STAGES, POLICY_METRICS, STAGES

MAX_PARAM_LENGTH = 6000
REDACTED = "***"
# a name part that holds a secret: HF_TOKEN, db.password, PREFECT_API_KEY, AWS_SECRET_ACCESS_KEY (not max_new_tokens)
SECRET_NAME = re.compile(r"(?:^|[_.\-])(?:token|password|passwd|pwd|secret|api[_\-]?key|apikey|access[_\-]?key|"
                         r"credentials?|private[_\-]?key)(?:$|[_.\-])", re.I)
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)
_QUERY_SECRET = re.compile(r"(?P<name>[?&;][^=&\s]*(?:token|passw|secret|key|sig|signature|credential)[^=&\s]*=)"
                           r"(?P<value>[^&\s]+)", re.I)


def _secret_values() -> list[str]:
    """Values of environment variables named like secrets (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, PREFECT_API_KEY,
    AWS_SECRET_ACCESS_KEY, ...) and passwords inside URIs in the environment: never logged, wherever they appear."""
    values = set()
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 4:
            values.add(value)
        for match in _USERINFO.finditer(value):
            values.add(match["password"])
    return sorted(values, key=len, reverse=True)


def redact(value: Any, name: str = "", secrets: list[str] | None = None) -> Any:
    """A value safe to log as a param, tag or config artifact: text under secret-named keys becomes ***, passwords in URIs
    (``scheme://user:PASSWORD@host``) and secret query arguments (``?token=...``) become ***, and so does any
    occurrence of a secret held in the environment. Dicts and lists are redacted item by item. ``secrets``: the
    environment's secrets when the caller already read them (one scan for a whole batch)."""
    if secrets is None:
        secrets = _secret_values()
    if isinstance(value, dict):
        return {k: redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, name, secrets) for v in value]
    if name and SECRET_NAME.search(name) and isinstance(value, str) and value:
        return REDACTED  # a credential is text: a number under a secret-like name (a task's ``secret`` seed) stays
    if not isinstance(value, str):
        return value
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}{REDACTED}", text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def close_orphans(client: MlflowClient) -> list[str]:
    """Mark KILLED every RUNNING run whose owning process (tag ``roads.owner``) is gone — a study killed with
    SIGKILL, or a machine that went down — with the reason in ``roads.error``. Returns the run ids."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    closed = []
    for start in range(0, len(experiments), 100):
        runs = client.search_runs(experiments[start:start + 100], "attributes.status = 'RUNNING'", max_results=5000)
        for run in runs:
            tag = run.data.tags.get("roads.owner")
            if tag and not owner_alive(tag):
                client.set_tag(run.info.run_id, "roads.error", f"its process ({tag}) ended before the run did "
                               "(killed?); marked KILLED by the next run on this store")
                client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
    return closed


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def remote_tracking(uri: str | None = None) -> bool:
    """A tracking server (http/https/databricks) stores artifacts itself; a database or local store gets ours."""
    uri = uri if uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    return urlparse(uri).scheme in ("http", "https", "databricks")


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


EXPERIMENT_KIND = "mlflow.experimentKind"


def experiment_id(client: MlflowClient, name: str, artifact_root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND not in exp.tags:  # made before roads set the kind
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return exp.experiment_id
    location = None if remote_tracking() else (artifact_root / name.replace("/", "-")).resolve().as_uri()
    try:  # a classic ML experiment: the UI opens on its runs, not on the GenAI traces overview
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"})
    except MlflowException:  # created by a concurrent run in the meantime
        return client.get_experiment_by_name(name).experiment_id


def _params(data: dict) -> list[Param]:
    secrets = _secret_values()
    return [Param(k, str(redact(v, k, secrets))[:MAX_PARAM_LENGTH]) for k, v in flatten(data).items()]


def _tags(tags: dict[str, str]) -> dict[str, str]:
    secrets = _secret_values()
    return {k: str(redact(v, k, secrets)) for k, v in tags.items()}


def outcome_digest(results: dict[str, dict], params: dict) -> str:
    """What a study run computed (every node's cache key and output digest) and how it was asked (its params): two
    runs with the same digest record the same thing, so a fully cached rerun reuses the run that recorded it."""
    nodes = sorted((node, r.get("cache_key", ""), r["artifact"]["digest"]) for node, r in results.items())
    blob = json.dumps({"nodes": nodes, "params": flatten(params)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def recorded_run(client: MlflowClient, experiment: str, digest: str) -> str | None:
    """The FINISHED study run of ``experiment`` (a name) that recorded ``digest``, if there is one."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`roads.outcome_digest` = '{digest}' and "
                              "attributes.status = 'FINISHED'", max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def standard_tags() -> dict[str, str]:
    """MLflow's own source, git and user tags (the UI's Source and User columns) and this process as the owner."""
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": " ".join(["roads", *sys.argv[1:]])[:500]
            if Path(sys.argv[0]).name == "roads" else Path(sys.argv[0]).name,
            "mlflow.source.git.commit": git_commit(), "mlflow.user": user(), "roads.owner": owner()}


def study_params(study: Study, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A study run's params: what it is (pipeline, tasks, seeds, stages, overrides) and every resolved setting that
    differs from the study file's defaults, flattened (``sft.epochs``, ``tasks.gap.alphabet``,
    ``variants.online_dpo_sft.set.start``) — the axes the MLflow compare view plots studies against."""
    base = load_study_file(study.path)

    def settings(defaults, tasks, variants) -> dict[str, Any]:
        return flatten({**defaults.model_dump(), "tasks": {t: tasks[t].model_dump() for t in study.spec.tasks if t in tasks},
                        "variants": {v: variants[v].model_dump() for v in study.spec.stages if v in variants}})

    was, now = settings(base.defaults, base.tasks, base.variants), settings(study.defaults, study.tasks, study.variants)
    missing = object()
    return {"pipeline": study.pipeline, "pipeline.tasks": ",".join(study.spec.tasks),
            "pipeline.seeds": ",".join(map(str, study.spec.seeds)), "pipeline.stages": ",".join(study.spec.stages),
            "overrides": " ".join(overrides) or "-",
            **{key: value for key, value in now.items() if was.get(key, missing) != value}}


# --- what a stage ran on: the base model, LoRA, the data, and the model it made (issue 14 item 8) -------------------
# the splits of a data folder and the context MLflow shows for each (mlflow.data.context)
SPLIT_CONTEXT = {"sft": "training", "pairs_train": "training", "pairs_judge": "judge training",
                 "sft_val": "validation", "pairs_val": "validation", "pairs_select": "selection",
                 "eval_prompts": "evaluation"}


def base_model(model: ModelConfig | None) -> dict[str, str]:
    """Tags naming the base model every stage of the study stands on: ``model.pretrained`` (a name or path) and the
    digest of its files (the one in the cache keys), or the preset built from scratch."""
    if model is None:
        return {}
    if not model.pretrained:
        return {"roads.base_model": f"preset:{model.preset}", "roads.base_model_digest":
                f"built from scratch (preset {model.preset}, vocabulary {model.vocab_size}, from the seed)"}
    from roads.config import StageSpec
    from tasks.keys import _pretrained_digest

    digest = _pretrained_digest(StageSpec(stage="sft", params={}, seed=0, model=model))
    return {"roads.base_model": model.pretrained,
            "roads.base_model_digest": digest[0].split("=", 1)[1] if digest else "a hub name: not hashed here"}


def lora_tags(node: Node, model: ModelConfig | None) -> dict[str, str]:
    """``roads.lora``: the LoRA settings a LORA_STAGES stage trained with, or 'none' (full fine-tuning)."""
    if node.stage not in LORA_STAGES:
        return {}
    lora = model.lora if model is not None else node.spec.lora
    return {"roads.lora": json.dumps(lora.model_dump(), sort_keys=True) if lora is not None else "none"}


@lru_cache(maxsize=256)
def _split_dataset(file: str, size: int, mtime: int, name: str):
    """An MLflow dataset entity of one split file (a JSONL of the artifact store): its rows and schema
    (``mlflow.data.from_pandas``), its path as the source, the sha256 of its bytes as the digest."""
    import warnings

    import mlflow.data
    import pandas as pd
    from mlflow.data.dataset_source_registry import get_registered_sources

    digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]
    frame = pd.read_json(file, lines=True) if size else pd.DataFrame()
    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(frame, source=local(str(file)), name=name, digest=digest)._to_mlflow_entity()


def data_inputs(folder: str | None, label: str, context_of: dict[str, str] = SPLIT_CONTEXT) -> list[DatasetInput]:
    """The splits of the data folder a stage read, as MLflow dataset inputs named ``<task>/seed<N>/<split>``."""
    if not folder or not Path(folder).is_dir():
        return []
    out = []
    for split, context in context_of.items():
        file = Path(folder) / f"{split}.jsonl"
        if file.is_file():
            stat = file.stat()
            out.append(DatasetInput(_split_dataset(str(file), stat.st_size, stat.st_mtime_ns, f"{label}/{split}"),
                                    tags=[InputTag("mlflow.data.context", context)]))
    return out


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "policy.json").is_file()


class StudyTracker:
    def __init__(self, pipeline: str, artifact_root: Path, run_name: str, tags: dict[str, str], params: dict,
                 model: ModelConfig | None = None):
        self.model = model  # the study's base model (model.pretrained or a preset), named on every stage's run
        self.model_ids: dict[str, str] = {}  # artifact digest -> the MLflow logged model that stands for it
        self.client = MlflowClient()
        self.experiment_id = experiment_id(self.client, pipeline, artifact_root)
        self.params = params
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags=_tags({"roads.kind": "study", "roads.pipeline": pipeline, "roads.git_commit": git_commit(),
                        **standard_tags(), **tags}),
        )
        self.parent_id = run.info.run_id
        self.open: set[str] = {self.parent_id}  # runs not yet terminated: abort() fails them
        batch = _params(params)
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.parent_id, params=batch[start:start + 100], synchronous=True)

    def log_dict(self, data: dict, name: str) -> None:
        """A JSON artifact of the parent run, redacted."""
        self.client.log_dict(self.parent_id, redact(data), name)

    def start_child(self, node: Node) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=node.id,
            tags=_tags({
                "mlflow.parentRunId": self.parent_id,
                "roads.kind": "stage",
                "roads.stage": node.stage,
                "roads.node": node.id,
                "roads.task": node.spec.task_name,
                "roads.seed": str(node.spec.seed),
                "roads.policy": node.spec.policy or "",
                "roads.fingerprint": node.spec.fingerprint(),
                "roads.git_commit": git_commit(),
                **base_model(self.model),
                **lora_tags(node, self.model),
                **standard_tags(),
            }),
        )
        params = {"stage": node.stage, **node.spec.model_dump(exclude={"stage", "params"}), **node.spec.params}
        self.open.add(run.info.run_id)
        self.client.log_batch(run.info.run_id, params=_params(params), synchronous=True)
        return run.info.run_id

    def finish_child(self, run_id: str, node: Node, result: dict, inputs: dict[str, dict] | None = None) -> bool:
        """Tags, final metrics and artifacts of a finished node; returns True when the result was a cache hit.
        Per-step training metrics live in the run that produced the result (tag ``roads.produced_by``). ``inputs``
        (input name -> the result it read) give the run its lineage: the data as MLflow datasets, the models it read
        (``lineage``)."""
        hit = result.get("produced_by") != run_id
        tags = {
            "roads.cache_key": result["cache_key"],
            "roads.cache": "hit" if hit else "miss",
            "roads.produced_by": result.get("produced_by") or "",
            "roads.artifact_path": result["artifact"]["path"],
            "roads.artifact_digest": result["artifact"]["digest"],
            "roads.worker": result.get("worker", ""),
        }
        now = int(time.time() * 1000)
        logged = set() if hit else set(result.get("logged_metrics", []))  # per-step history the task wrote itself
        if not hit and node.spec.launched:  # the launched ranks logged too, in processes of their own
            logged |= set(self.client.get_run(run_id).data.metrics)
        metrics = [Metric(k.replace("@", "_"), float(v), now, 0) for k, v in result["metrics"].items()
                   if k.replace("@", "_") not in logged]
        metrics.append(Metric(f"{node.stage}/wall_seconds", float(result.get("wall_seconds", 0.0)), now, 0))
        run_tags = [RunTag(k, v) for k, v in _tags(tags).items()]
        for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 entities per batch
            self.client.log_batch(run_id, metrics=metrics[start:start + 900], tags=run_tags if start == 0 else [],
                                  synchronous=True)
        self.client.log_dict(run_id, redact(node.spec.model_dump()), "config.json")
        self.lineage(run_id, node, result, inputs or {}, hit)
        folder = Path(result["artifact"]["path"])
        for name in result.get("files", []):
            if (folder / name).is_file():
                self.client.log_artifact(run_id, str(folder / name))
        self._terminate(run_id, "FINISHED")
        return hit

    def lineage(self, run_id: str, node: Node, result: dict, inputs: dict[str, dict], hit: bool) -> None:
        """What the stage read and made, where the MLflow UI shows it: the splits of its data folder as datasets (a
        data stage: those it wrote), the models of its inputs as model inputs, and — for a stage whose output is a
        model (a policy, a reward model) — a logged model standing for the folder (an external model: its path and
        digest as tags, no weights copied), the run's output when it computed it, and ``roads.model_path`` on the
        run (load it with ``AutoModelForCausalLM.from_pretrained(path)``, or ``roads.models.load_policy``)."""
        data = result["artifact"]["path"] if "data" in STAGES[node.stage].roles else (
            inputs.get("data", {}).get("artifact", {}).get("path"))
        label = f"{node.spec.task_name}/seed{node.spec.seed}"
        datasets = data_inputs(data, label, SPLIT_CONTEXT if data != result["artifact"]["path"] else
                               {split: "output" for split in SPLIT_CONTEXT})
        read = [self.model_id(ref["artifact"]["digest"]) for name, ref in inputs.items()
                if name != "data" and _is_model(Path(ref["artifact"]["path"]))]
        models = [LoggedModelInput(model_id) for model_id in dict.fromkeys(read) if model_id]
        if datasets or models:
            self.client.log_inputs(run_id, datasets=datasets or None, models=models or None)
        folder = Path(result["artifact"]["path"])
        if not ({"policy", "verifier"} & set(STAGES[node.stage].roles)) or not _is_model(folder):
            return
        digest = result["artifact"]["digest"]
        tags = {"roads.model_path": str(folder), "roads.model_digest": digest,
                "roads.model_load": f"AutoModelForCausalLM.from_pretrained({str(folder)!r})"
                if "policy" in STAGES[node.stage].roles else f"roads.models.load_reward_model({str(folder)!r})"}
        if not hit:
            from mlflow import create_external_model

            logged = create_external_model(
                name=node.name, source_run_id=run_id, experiment_id=self.experiment_id,
                model_type="roads.policy" if "policy" in STAGES[node.stage].roles else "roads.verifier",
                tags=_tags({**tags, "roads.node": node.id, "roads.stage": node.stage, **base_model(self.model),
                            **lora_tags(node, self.model)}),
                params={k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(node.spec.params).items()})
            self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
            self.model_ids[digest] = logged.model_id
        if self.model_id(digest):  # a hit: the model its producer logged
            tags["roads.model_id"] = self.model_id(digest)
        for key, value in _tags(tags).items():
            self.client.set_tag(run_id, key, value)

    def model_id(self, digest: str) -> str:
        """The logged model standing for the output with ``digest`` ('' when none was logged in this experiment)."""
        if digest not in self.model_ids:
            found = self.client.search_logged_models([self.experiment_id], max_results=1,
                                                     filter_string=f"tags.`roads.model_digest` = '{digest}'")
            self.model_ids[digest] = found[0].model_id if found else ""
        return self.model_ids[digest]

    def fail_child(self, run_id: str, message: str) -> None:
        self.client.set_tag(run_id, "roads.error", redact(message)[:5000])
        self._terminate(run_id, "FAILED")

    def _terminate(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)
        self.open.discard(run_id)

    def abort(self, message: str) -> None:
        """The flow itself failed (not a stage): every run still open is marked FAILED with the reason, so nothing
        is left RUNNING in the UI."""
        for run_id in list(self.open):
            try:
                self.fail_child(run_id, message)
            except MlflowException:  # the server went away too: nothing more can be recorded
                self.open.discard(run_id)

    def finish(self, status: str, summary_rows: list[dict], files: dict[str, str], budget_rows: list[dict] = (),
               report_folder: str | None = None, report_files: list[str] = (),
               report_metrics: dict[str, float] | None = None, results: dict[str, dict] | None = None,
               error: str = "") -> None:
        """The parent run's summary metrics, budget per policy, the report's metrics (study table, gap summary,
        hypotheses) and files, text files, the digest of what it computed (``outcome_digest``); then its status
        (a failed study carries its first failure, ``node: reason``, in ``roads.error``)."""
        now = int(time.time() * 1000)
        if error:
            self.client.set_tag(self.parent_id, "roads.error", redact(error)[:5000])
        if results is not None and status == "FINISHED":
            self.client.set_tag(self.parent_id, "roads.outcome_digest", outcome_digest(results, self.params))
        metrics = [Metric(k, float(v), now, 0) for k, v in (report_metrics or {}).items()]
        for row in summary_rows:
            for key in POLICY_METRICS:
                if row.get(key) is not None:
                    metrics.append(Metric(f"{row['task']}/seed{row['seed']}/{row['policy']}/{key}", float(row[key]), now, 0))
        for row in budget_rows:
            for key in ("tokens_trained", "tokens_generated", "wall_seconds"):
                metrics.append(Metric(f"budget/{row['task']}/{row['policy']}/{key}", float(row[key]), now, 0))
        for name in report_files:
            if report_folder and (Path(report_folder) / name).is_file():
                self.client.log_artifact(self.parent_id, str(Path(report_folder) / name), "report")
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.parent_id, metrics=metrics[start:start + 1000], synchronous=True)
        for name, text in files.items():
            self.client.log_text(self.parent_id, text, name)
        self._terminate(self.parent_id, status)

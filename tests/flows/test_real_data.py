"""Issue 14 on a real-data study, end to end through Prefect and MLflow: the HH-RLHF file on a small local
'pretrained' model (a Llama built from config and saved, as a user's folder would be) with LoRA — the proxy-judged
table in the report and in `roads run`'s printed summary (item 5), the per-model learning rates in the stage runs
(item 7), and on every stage's MLflow run the base model with its digest, the LoRA settings, the data as MLflow
datasets, and each trained model as a logged model a user loads from its run (item 8)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.study import run_study
from roads.model_defaults import PRETRAINED_LRS
from support import HH_FILE

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["prepare_data.n_sft=32", "prepare_data.n_pairs=32", "sft.batch_size=16", "reward_model.batch_size=16",
         "offline_dpo.batch_size=16", "evaluate.max_new_tokens=8", "model.lora.rank=4", "report.n_bootstrap=200"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    path = tmp_path_factory.mktemp("home")
    old = os.environ.get("ROADS_HOME")
    os.environ["ROADS_HOME"] = str(path)
    yield path
    os.environ["ROADS_HOME"] = old or ""


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama and a byte-level tokenizer trained on the HH-RLHF text, saved like any local model folder."""
    from roads.data.preferences import load_preferences
    from roads.models import build_tokenizer, new_causal_lm

    rows = list(load_preferences(str(HH_FILE), format="hh-rlhf", limit=200))
    tokenizer = build_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=512)
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-llama"
    new_causal_lm("tiny", tokenizer, seed=0, max_positions=1024).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def first(home, pretrained):
    os.chdir(ROOT)
    return run_study("hh-rlhf-smoke", [f"model.pretrained={pretrained}", *SMALL])


def child_runs(client, outcome) -> dict:
    runs = client.search_runs([outcome["experiment_id"]], f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'",
                              max_results=100)
    return {r.data.tags["roads.node"]: client.get_run(r.info.run_id) for r in runs}  # get_run: with model inputs


def test_the_proxy_judged_table_reaches_the_report_and_the_printed_summary(first, capsys):
    from flows.cli import print_outcome

    assert {n["cache"] for n in first["nodes"]} == {"miss"}
    rows = {r["policy"]: r for r in first["summary"]}
    assert rows["sft"]["proxy_win_rate"] == 0.5 and rows["sft"]["kl_to_reference"] == 0.0
    assert 0.0 <= rows["offline_dpo"]["proxy_win_rate"] <= 1.0 and rows["offline_dpo"]["gold_reward_mean"] is None
    assert 0.0 <= rows["offline_dpo"]["finished_rate"] <= 1.0 and rows["offline_dpo"]["length_mean"] > 0
    print_outcome(first, 1.0)
    out = capsys.readouterr().out
    assert "## Without a gold reward: the proxy-judged table" in out and "A proxy, not a gold reward" in out
    assert "judge `reward_model_judge` (global verifier) trained on" in out and "pairs_judge pairs" in out
    line = next(x for x in out.splitlines() if x.startswith("| hh-rlhf | offline_dpo | 1 |") and x.endswith(
        "| reward_model_judge |"))
    assert f"{rows['offline_dpo']['proxy_win_rate']:.3f} [" in line
    metrics = MlflowClient().get_run(first["parent_run_id"]).data.metrics
    assert metrics["hh-rlhf/seed0/offline_dpo/proxy_win_rate"] == rows["offline_dpo"]["proxy_win_rate"]
    assert "hh-rlhf/seed0/offline_dpo/gold_reward_mean" not in metrics


def test_every_stage_run_names_the_base_model_its_digest_and_lora(first, pretrained):
    from tasks.keys import _folder_digest, _listing

    runs = child_runs(MlflowClient(), first)
    digest = _folder_digest(str(Path(pretrained).resolve()), _listing(Path(pretrained).resolve()))
    for node, run in runs.items():
        tags = run.data.tags
        assert tags["roads.base_model"] == pretrained and tags["roads.base_model_digest"] == digest, node
    lora = json.loads(runs["hh-rlhf/seed0/sft"].data.tags["roads.lora"])
    assert lora["rank"] == 4 and lora["alpha"] == 16.0
    assert "roads.lora" not in runs["hh-rlhf/seed0/prepare_data"].data.tags  # not a LoRA stage
    # the per-model defaults: LoRA learning rates for pretrained weights where the pipeline and --set leave them
    assert float(runs["hh-rlhf/seed0/sft"].data.params["lr"]) == PRETRAINED_LRS["sft.lr"][1]
    assert float(runs["hh-rlhf/seed0/reward_model_judge"].data.params["lr"]) == PRETRAINED_LRS["reward_model.lr"][1]


def test_the_data_are_mlflow_datasets_on_the_stage_runs(first):
    runs = child_runs(MlflowClient(), first)
    data = Path(runs["hh-rlhf/seed0/prepare_data"].data.tags["roads.artifact_path"])
    for node, context in (("hh-rlhf/seed0/sft", "training"), ("hh-rlhf/seed0/prepare_data", "output")):
        inputs = {d.dataset.name: d for d in runs[node].inputs.dataset_inputs}
        split = inputs["hh-rlhf/seed0/pairs_train"]
        file = data / "pairs_train.jsonl"
        assert json.loads(split.dataset.profile)["num_rows"] == len(file.read_text().splitlines())
        assert split.dataset.digest == hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        assert json.loads(split.dataset.source)["uri"] == str(file) and split.dataset.source_type == "local"
        assert {t.key: t.value for t in split.tags}["mlflow.data.context"] == context
        assert "hh-rlhf/seed0/pairs_judge" in inputs and "hh-rlhf/seed0/eval_prompts" in inputs
    judge_inputs = {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                    for d in runs["hh-rlhf/seed0/reward_model_judge"].inputs.dataset_inputs}
    assert judge_inputs["hh-rlhf/seed0/pairs_judge"] == "judge training"
    assert judge_inputs["hh-rlhf/seed0/pairs_val"] == "validation"


def test_trained_models_are_logged_models_a_user_loads_from_the_run(first):
    from transformers import AutoModelForCausalLM

    client = MlflowClient()
    runs = child_runs(client, first)
    models = {m.name: m for m in client.search_logged_models([first["experiment_id"]])}
    assert set(models) == {"sft", "reward_model", "reward_model_judge", "offline_dpo"}
    dpo = models["offline_dpo"]
    run = runs["hh-rlhf/seed0/offline_dpo"]
    assert dpo.source_run_id == run.info.run_id and dpo.model_type == "roads.policy"
    assert [o.model_id for o in run.outputs.model_outputs] == [dpo.model_id]
    assert run.data.tags["roads.model_id"] == dpo.model_id
    path = run.data.tags["roads.model_path"]
    assert dpo.tags["roads.model_path"] == path == run.data.tags["roads.artifact_path"]
    assert dpo.tags["mlflow.model.isExternal"] == "true"  # its weights stay in the artifact store, not copied
    assert not any(f.path.endswith(".safetensors") for f in client.list_artifacts(run.info.run_id))
    model = AutoModelForCausalLM.from_pretrained(path)  # what the run page's tag says to do
    assert model.config.model_type == "llama"
    assert models["reward_model_judge"].model_type == "roads.verifier"
    # the evaluation of offline DPO read the policy, the SFT reference and the judge: its model inputs
    read = {m.model_id for m in runs["hh-rlhf/seed0/evaluate[offline_dpo]"].inputs.model_inputs}
    assert read == {dpo.model_id, models["sft"].model_id, models["reward_model_judge"].model_id}


def test_a_cached_rerun_logs_no_new_models(first, pretrained):
    again = run_study("hh-rlhf-smoke", [f"model.pretrained={pretrained}", *SMALL])
    assert {n["cache"] for n in again["nodes"]} == {"hit"}
    assert len(MlflowClient().search_logged_models([first["experiment_id"]])) == 4

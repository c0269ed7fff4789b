"""Tests for roads.plan (stage closure, the DAG, downstream/upstream) and roads.artifacts (content digests, atomic
commits, result JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roads.artifacts import (
    ArtifactRef,
    StageResult,
    commit_dir,
    digest_dir,
    new_temp_dir,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from roads.config import check_stage_closure, load_study
from roads.plan import build_plan, policies, downstream, upstream
from roads.stage_table import with_role

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"


@pytest.fixture(scope="module")
def study():
    return load_study(PIPELINES, "basic", ["pipeline.seeds=[0,1]"])


@pytest.fixture(scope="module")
def nodes(study):
    return build_plan(study)


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    "stages",
    [
        ["prepare_data"],
        ["prepare_data", "sft"],
        ["prepare_data", "sft", "reward_model"],
        ["prepare_data", "sft", "offline_dpo"],
        ["prepare_data", "sft", "evaluate"],
        ["evaluate", "offline_dpo", "sft", "prepare_data"],  # order does not matter
        ["prepare_data", "sft", "reward_model", "offline_dpo", "evaluate"],
    ],
)
def test_closed_stage_lists(stages):
    assert check_stage_closure(stages) is None


@pytest.mark.parametrize(
    "stages, needs",
    [
        (["sft"], "prepare_data"),
        (["prepare_data", "offline_dpo"], "sft"),
        (["prepare_data", "reward_model"], "sft"),
        (["prepare_data", "evaluate"], "sft"),
        (["sft", "reward_model"], "prepare_data"),
    ],
)
def test_open_stage_lists(stages, needs):
    problem = check_stage_closure(stages)
    assert problem is not None and "\n" not in problem
    assert repr(needs) in problem


def test_plan_shape(study, nodes):
    units = [(t, s) for t in study.spec.tasks for s in study.spec.seeds]
    assert len(units) == 6
    assert policies(study) == [s for s in with_role("policy") if s in study.spec.stages]
    per_unit = len([s for s in study.spec.stages if s not in ("evaluate", "report")]) + len(policies(study))
    assert len(nodes) == len(units) * per_unit + ("report" in study.spec.stages)  # evaluate once per policy; one report
    ids = [n.id for n in nodes]
    assert len(set(ids)) == len(ids)
    index = {node_id: i for i, node_id in enumerate(ids)}
    for node in nodes:
        for dep in node.inputs.values():
            assert index[dep] < index[node.id]
            if node.stage != "report":  # inputs stay within the (task, seed) unit; the report reads them all
                assert dep.rsplit("/", 1)[0] == node.id.rsplit("/", 1)[0]


def test_evaluate_once_per_policy(study, nodes):
    for task in study.spec.tasks:
        for seed in study.spec.seeds:
            unit = f"{task}/seed{seed}"
            evals = [n for n in nodes if n.stage == "evaluate" and n.id.startswith(unit + "/")]
            assert sorted(n.spec.policy for n in evals) == sorted(s for s in with_role("policy") if s in study.spec.stages)
            for n in evals:
                assert n.id == f"{unit}/evaluate[{n.spec.policy}]"
                assert n.inputs == {"data": f"{unit}/prepare_data", "reference": f"{unit}/sft",
                                    "policy": f"{unit}/{n.spec.policy}"}
                assert n.spec.seed == seed and n.spec.task_name == task


def test_node_specs(nodes):
    for n in nodes:
        assert (n.spec.task is not None) == (n.stage == "prepare_data")
        assert (n.spec.model is not None) == (n.stage == "sft")
        assert (n.spec.policy is not None) == (n.stage == "evaluate")


def test_downstream_of_sft(nodes):
    down = downstream(nodes, "sft")
    by_stage = {}
    for n in nodes:
        by_stage.setdefault(n.stage, set()).add(n.id)
    assert by_stage["sft"] <= down
    assert by_stage["reward_model"] <= down
    assert by_stage["offline_dpo"] <= down
    assert by_stage["evaluate"] <= down
    assert not by_stage["prepare_data"] & down


def test_downstream_of_offline_dpo(nodes):
    down = downstream(nodes, "offline_dpo")
    assert all(n.stage in ("offline_dpo", "report") or n.id.endswith("evaluate[offline_dpo]")
               for n in nodes if n.id in down)
    assert any(n.id.endswith("evaluate[offline_dpo]") for n in nodes if n.id in down)


def test_downstream_of_prepare_data_is_everything(nodes):
    assert downstream(nodes, "prepare_data") == {n.id for n in nodes}


def test_upstream_of_offline_dpo(nodes):
    up = upstream(nodes, "offline_dpo")
    assert {n.stage for n in nodes if n.id in up} == {"prepare_data", "sft", "offline_dpo"}
    assert up == {n.id for n in nodes if n.stage in ("prepare_data", "sft", "offline_dpo")}


def test_upstream_of_evaluate_is_everything_but_reward_model(nodes):
    up = upstream(nodes, "evaluate")
    assert up == {n.id for n in nodes if n.stage not in ("reward_model", "report")}


def test_upstream_of_prepare_data(nodes):
    assert upstream(nodes, "prepare_data") == {n.id for n in nodes if n.stage == "prepare_data"}


def test_the_default_study_plan_wires_every_policy():
    study = load_study(PIPELINES, "default")
    nodes = {n.id: n for n in build_plan(study)}
    unit = "shuffle/seed0"
    policies_evaluated = {n.spec.policy for n in nodes.values() if n.id.startswith(unit) and n.stage == "evaluate"}
    assert policies_evaluated == {"sft", "sft_chosen", "offline_dpo", "offline_dpo_2x", "offline_dpo_gold",
                                  "online_dpo_sft", "online_dpo_dpo", "online_dpo_gold", "online_rl"}
    assert nodes[f"{unit}/online_dpo_dpo"].inputs == {"data": f"{unit}/prepare_data", "reference": f"{unit}/sft",
                                                      "start": f"{unit}/offline_dpo", "verifier": f"{unit}/reward_model",
                                                      "selection": f"{unit}/select_dpo"}
    # both roads, and both controls, take their DPO settings from the same rule
    assert {nodes[f"{unit}/{e}"].inputs["selection"] for e in ("offline_dpo", "offline_dpo_gold", "online_dpo_sft",
                                                                "online_dpo_gold")} == {f"{unit}/select_dpo"}
    assert nodes[f"{unit}/online_dpo_sft"].inputs["start"] == f"{unit}/sft"
    assert "verifier" not in nodes[f"{unit}/online_dpo_gold"].inputs  # the gold reward needs no model
    assert nodes[f"{unit}/online_rl"].inputs["verifier"] == f"{unit}/reward_model"
    dpo, online = nodes[f"{unit}/offline_dpo"].spec.params, nodes[f"{unit}/online_dpo_sft"].spec.params
    assert all(online[k] == dpo[k] for k in ("beta", "lr", "epochs", "batch_size", "loss_type"))  # same DPO settings
    assert nodes[f"{unit}/offline_dpo_2x"].spec.params["epochs"] == dpo["epochs"] + 1
    evaluations = {i for i, n in nodes.items() if n.stage == "evaluate"}
    measured = {i for i, n in nodes.items() if n.stage in ("measure_gap", "select_dpo")}
    assert set(nodes["report"].inputs.values()) == evaluations | measured and len(evaluations) == 3 * 5 * 9  # tasks, seeds, policies


def test_partial_pipeline_plan():
    study = load_study(PIPELINES, "smoke", ["pipeline.stages=[prepare_data,sft,evaluate]"])
    nodes = build_plan(study)
    assert {n.stage for n in nodes} == {"prepare_data", "sft", "evaluate"}
    assert [n.spec.policy for n in nodes if n.stage == "evaluate"] == ["sft"] * len(study.spec.tasks)


# --------------------------------------------------------------------------- artifacts


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {"a.txt": b"hello", "sub/b.bin": bytes(range(256)), "metrics.json": b'{"x": 1}\n'}


def test_digest_dir_stable(tmp_path):
    a = make_tree(tmp_path / "a", FILES)
    b = make_tree(tmp_path / "b", dict(reversed(list(FILES.items()))))  # written in another order
    assert digest_dir(a) == digest_dir(a) == digest_dir(b)
    assert len(digest_dir(a)) == 64


@pytest.mark.parametrize(
    "change",
    [
        lambda f: {**f, "a.txt": b"hellp"},  # one byte
        lambda f: {**f, "a.txt": b"hello "},  # one byte more
        lambda f: {("A.txt" if k == "a.txt" else k): v for k, v in f.items()},  # a name
        lambda f: {("b.bin" if k == "sub/b.bin" else k): v for k, v in f.items()},  # a folder
        lambda f: {**f, "empty": b""},  # an extra empty file
        lambda f: {k: v for k, v in f.items() if k != "a.txt"},  # a file fewer
        lambda f: {"a.txt": FILES["metrics.json"], "metrics.json": FILES["a.txt"],
                   "sub/b.bin": FILES["sub/b.bin"]},  # contents swapped between names
    ],
)
def test_digest_dir_changes(tmp_path, change):
    base = make_tree(tmp_path / "base", FILES)
    other = make_tree(tmp_path / "other", change(dict(FILES)))
    assert digest_dir(base) != digest_dir(other)


def test_digest_dir_framing_is_unambiguous(tmp_path):
    two = make_tree(tmp_path / "two", {"a": b"X", "b": b"Y"})
    one = make_tree(tmp_path / "one", {"a": b"X\0b\0Y"})
    assert digest_dir(one) != digest_dir(two)


def test_commit_dir_moves_to_content_address(tmp_path):
    store = tmp_path / "store"
    tmp = new_temp_dir(store, "sft")
    assert tmp.parent == store / "sft" and tmp.name.startswith(".tmp-")
    make_tree(tmp, FILES)
    digest = digest_dir(tmp)
    ref = commit_dir(tmp, store, "sft")
    assert isinstance(ref, ArtifactRef)
    assert ref.digest == digest
    assert Path(ref.path) == (store / "sft" / digest[:24]).resolve()
    assert ref.exists()
    assert not tmp.exists()
    assert digest_dir(ref.path) == digest
    assert (Path(ref.path) / "sub" / "b.bin").read_bytes() == FILES["sub/b.bin"]
    assert [p.name for p in (store / "sft").iterdir()] == [digest[:24]]  # no temp folder left


def test_commit_identical_content_twice(tmp_path):
    store = tmp_path / "store"
    first = commit_dir(make_tree(new_temp_dir(store, "sft"), FILES), store, "sft")
    marker = Path(first.path) / "a.txt"
    mtime = marker.stat().st_mtime_ns
    tmp2 = make_tree(new_temp_dir(store, "sft"), FILES)
    second = commit_dir(tmp2, store, "sft")
    assert second == first
    assert not tmp2.exists()
    assert marker.stat().st_mtime_ns == mtime  # the first copy is kept
    assert len(list((store / "sft").iterdir())) == 1


def test_commit_different_content(tmp_path):
    store = tmp_path / "store"
    a = commit_dir(make_tree(new_temp_dir(store, "sft"), FILES), store, "sft")
    b = commit_dir(make_tree(new_temp_dir(store, "sft"), {**FILES, "a.txt": b"other"}), store, "sft")
    assert a.path != b.path and a.exists() and b.exists()


def test_artifact_ref_exists_false_when_gone(tmp_path):
    assert not ArtifactRef(path=str(tmp_path / "gone"), digest="0" * 64).exists()


def test_stage_result_json_round_trip(tmp_path):
    ref = ArtifactRef(path=str(tmp_path / "x"), digest="ab" * 32)
    result = StageResult(metrics={"gold_reward_mean": 0.75, "win_rate": 0.5}, files=["samples.jsonl"], artifact=ref)
    doc = json.loads(json.dumps(result.to_json()))
    back = StageResult.from_json(doc)
    assert back == result
    assert back.artifact == ref and ArtifactRef.from_json(ref.to_json()) == ref


def test_json_helpers_round_trip(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1.5, "x"]})
    assert read_json(tmp_path / "m.json") == {"b": 1, "a": [1.5, "x"]}
    rows = [{"prompt": "p", "chosen": " a"}, {"prompt": "q", "chosen": "ü"}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    assert read_jsonl(tmp_path / "r.jsonl") == rows


def test_the_report_reads_its_policies_and_series_from_the_pipeline():
    study = load_study(PIPELINES, "learning-curves")
    report = next(n for n in build_plan(study) if n.stage == "report")
    listed = [e for e in study.spec.stages if e in policies(study)]
    assert report.spec.params["policies"] == listed  # the order of `stages`, not a list kept in the report
    assert report.spec.params["series"]["reward_model_1_8"] == "reward_model"
    assert report.spec.params["series"]["online_dpo_sft_1_2"] == "online_dpo_sft"
    assert "reward_model" not in report.spec.params["series"]  # the full-data entry is its own series
    mine = load_study(PIPELINES, "learning-curves", ["report.policies=[offline_dpo, sft]"])
    assert next(n for n in build_plan(mine) if n.stage == "report").spec.params["policies"] == ["offline_dpo", "sft"]

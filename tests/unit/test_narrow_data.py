"""narrow_data (H4): SFT-policy samples labelled by the gold reward, written as a complete data folder."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from roads.artifacts import ArtifactRef, read_json, read_jsonl, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import ModelConfig, NarrowDataConfig, PrepareDataConfig, SftConfig, TaskConfig
from roads.data import gold_reward_fn, task_of
from roads.errors import RoadsError
from roads.runner import execute
from roads.stages.narrow_data import COPIED, label_pairs, prefers_first

DATA_FILES = ("task.json", "sft.jsonl", "sft_val.jsonl", "pairs_select.jsonl", "pairs_train.jsonl", "pairs_val.jsonl", "eval_prompts.jsonl",
              "ceiling.json")


def narrow_spec(seed: int = 0, **params) -> StageSpec:
    cfg = NarrowDataConfig(**{"max_new_tokens": 8, **params})
    return StageSpec(stage="narrow_data", params=cfg.model_dump(), seed=seed, task_name="gap")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny gap data folder and an SFT policy trained on it for one step."""
    store = tmp_path_factory.mktemp("store")
    task = TaskConfig(family="gap")
    prep = StageSpec(stage="prepare_data", seed=0, task=task, task_name="gap",
                     params=PrepareDataConfig(n_sft=16, n_pairs=12, n_val_pairs=4, n_eval_prompts=4).model_dump())
    data = execute(prep, {}, store).artifact
    sft = StageSpec(stage="sft", seed=0, task_name="gap", model=ModelConfig(preset="tiny"),
                    params=SftConfig(epochs=1, batch_size=16, logging_steps=1).model_dump())
    policy = execute(sft, {"data": data}, store).artifact
    return {"data": data, "sft": policy}


@pytest.fixture(scope="module")
def narrow(inputs, tmp_path_factory):
    return execute(narrow_spec(), inputs, tmp_path_factory.mktemp("narrow"))


def test_output_is_a_complete_data_folder(narrow, inputs):
    out, data = Path(narrow.artifact.path), Path(inputs["data"].path)
    for name in DATA_FILES + ("budget.json",):
        assert (out / name).is_file(), name
    for name in COPIED:
        assert (out / name).read_bytes() == (data / name).read_bytes(), name
    assert task_of(out) == task_of(data)
    assert set(narrow.files) == set(DATA_FILES) | {"budget.json", "ceiling.json"}


def test_pairs_have_the_same_prompts_in_order_and_the_prepare_data_columns(narrow, inputs):
    pairs = read_jsonl(Path(narrow.artifact.path) / "pairs_train.jsonl")
    original = read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl")
    assert [r["prompt"] for r in pairs] == [r["prompt"] for r in original]
    assert all(set(r) == set(original[0]) for r in pairs)
    assert pairs != original  # sampled from the policy, not copied


def test_gold_columns_are_the_gold_reward(narrow, inputs):
    _, task = task_of(inputs["data"].path)
    gold = gold_reward_fn(task)
    for r in read_jsonl(Path(narrow.artifact.path) / "pairs_train.jsonl"):
        assert r["chosen_gold"] == gold(r["prompt"], r["chosen"])
        assert r["rejected_gold"] == gold(r["prompt"], r["rejected"])


def test_metrics_and_budget(narrow):
    m = narrow.metrics
    pairs = read_jsonl(Path(narrow.artifact.path) / "pairs_train.jsonl")
    assert m["narrow_data/n_pairs"] == len(pairs) == 12
    assert m["narrow_data/pairs_gold_agreement"] == sum(r["chosen_gold"] > r["rejected_gold"] for r in pairs) / 12
    assert m["narrow_data/pairs_gold_ties"] == sum(r["chosen_gold"] == r["rejected_gold"] for r in pairs) / 12
    assert m["narrow_data/chosen_gold_mean"] == pytest.approx(sum(r["chosen_gold"] for r in pairs) / 12)
    assert m["narrow_data/tokens_generated"] > 0
    assert read_json(Path(narrow.artifact.path) / "budget.json") == {"tokens_generated": m["narrow_data/tokens_generated"]}


def test_noiseless_labels_put_the_better_one_first(inputs, tmp_path):
    result = execute(narrow_spec(bt_temperature=0.0), inputs, tmp_path)
    pairs = read_jsonl(Path(result.artifact.path) / "pairs_train.jsonl")
    assert all(r["chosen_gold"] >= r["rejected_gold"] for r in pairs)
    assert result.metrics["narrow_data/pairs_gold_agreement"] + result.metrics["narrow_data/pairs_gold_ties"] == 1.0


def test_same_seed_same_output(narrow, inputs, tmp_path):
    again = execute(narrow_spec(), inputs, tmp_path / "again")
    assert again.artifact.digest == narrow.artifact.digest
    assert again.metrics == narrow.metrics
    other = execute(narrow_spec(seed=1), inputs, tmp_path / "seed1")
    assert other.artifact.digest != narrow.artifact.digest


def test_a_task_without_gold_reward_is_refused(inputs, tmp_path):
    data = tmp_path / "hh"
    data.mkdir()
    task = TaskConfig(family="preferences", source="hh.jsonl")
    write_json(data / "task.json", {"name": "hh", **task.model_dump()})
    write_jsonl(data / "pairs_train.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}])
    with pytest.raises(RoadsError, match="narrow_data.*gold reward") as err:
        execute(narrow_spec(), {"data": ArtifactRef(str(data), "x"), "sft": inputs["sft"]}, tmp_path / "store")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "store" / "narrow_data").exists()


def test_labelling():
    def gold(prompt, response):
        return {" good": 1.0, " bad": 0.0, " same": 0.5}[response]

    rng = random.Random(0)
    rows = label_pairs(["p"] * 4, [(" bad", " good"), (" good", " bad")] * 2, gold, 0.0, rng)
    assert all(r["chosen"] == " good" and r["chosen_gold"] == 1.0 and r["rejected_gold"] == 0.0 for r in rows)
    # τ = 0 on a tie: a fair coin, not always the first
    assert {prefers_first(0.5, 0.5, 0.0, rng) for _ in range(50)} == {True, False}
    # large τ: nearly a coin even for different rewards; small τ: nearly always the better
    firsts = sum(prefers_first(0.0, 1.0, 100.0, rng) for _ in range(2000))
    assert 800 < firsts < 1200
    assert sum(prefers_first(0.0, 1.0, 0.01, rng) for _ in range(2000)) == 0

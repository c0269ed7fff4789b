"""The paper's online DPO: pair construction by the verifier, prompts, and the shared reference."""

from pathlib import Path

import pytest

from roads.artifacts import read_jsonl, write_jsonl
from roads.config import load_study
from roads.plan import build_plan
from roads.runner import execute
from roads.stages.online_dpo import best_worst_pairs, online_prompts

ROOT = Path(__file__).resolve().parents[2]


def test_pairs_are_the_verifiers_best_and_worst():
    prompts = ["p1", "p2"]
    completions = [[" a", " b", " c", " d"], [" x", " y", " z"]]
    scores = [[0.2, 0.9, -1.0, 0.5], [3.0, 1.0, 2.0]]
    assert best_worst_pairs(prompts, completions, scores) == [
        {"prompt": "p1", "chosen": " b", "rejected": " c", "chosen_score": 0.9, "rejected_score": -1.0},
        {"prompt": "p2", "chosen": " x", "rejected": " y", "chosen_score": 3.0, "rejected_score": 1.0},
    ]


def test_ties_take_the_first_and_an_indifferent_verifier_gives_no_pair():
    pairs = best_worst_pairs(["p", "q"], [[" a", " b", " c"], [" a", " b"]], [[1.0, 1.0, 0.0], [0.5, 0.5]])
    assert pairs == [{"prompt": "p", "chosen": " a", "rejected": " c", "chosen_score": 1.0, "rejected_score": 0.0}]


def test_copies_of_a_text_are_exact_ties_whatever_the_float_noise_of_their_scores():
    """A text sampled twice and scored in two batches differs in the last bits: the copies must not become a pair
    of the same text, nor decide which copy is best."""
    noise = 1e-7
    pairs = best_worst_pairs(["p", "q"], [[" a", " a", " a"], [" a", " b", " a", " b"]],
                             [[0.3, 0.3 + noise, 0.3 - noise], [0.3, 0.1, 0.3 + noise, 0.1 - noise]])
    assert pairs == [{"prompt": "q", "chosen": " a", "rejected": " b", "chosen_score": 0.3, "rejected_score": 0.1}]


def test_prompt_augmentation_adds_unseen_sft_prompts(tmp_path):
    write_jsonl(tmp_path / "pairs_train.jsonl", [{"prompt": p} for p in ("a", "b", "a")])
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p} for p in ("b", "c", "d", "e", "f", "c")])
    assert online_prompts(tmp_path, 1) == ["a", "b"]
    assert online_prompts(tmp_path, 3) == ["a", "b", "c", "d", "e", "f"]


class Recorder:
    def __init__(self):
        self.logs = []

    def log_metrics(self, metrics, step=None):
        self.logs.append(metrics)

    def progress(self, message):
        pass


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    study = load_study(ROOT / "pipelines.yaml", "study-smoke", [
        "pipeline.seeds=[0]", "online_dpo.logging_steps=1",
        "pipeline.stages=[prepare_data, sft, reward_model, select_dpo, offline_dpo, online_dpo_sft, online_dpo_dpo,"
        " online_dpo_gold]"])
    store = tmp_path_factory.mktemp("store")
    results, trackers = {}, {}
    for node in build_plan(study):
        trackers[node.name] = Recorder()
        results[node.name] = execute(node.spec, {k: results[v.split("/")[-1]].artifact for k, v in node.inputs.items()},
                                     store, trackers[node.name])
    return results, trackers


def test_gold_verifier_pairs_agree_with_the_gold_reward(unit):
    results, _ = unit
    pairs = read_jsonl(Path(results["online_dpo_gold"].artifact.path) / "pairs.jsonl")
    assert pairs and all(p["chosen_gold"] > p["rejected_gold"] for p in pairs)
    assert all(p["chosen_score"] == p["chosen_gold"] for p in pairs)
    assert results["online_dpo_gold"].metrics["online_dpo/pairs_gold_agreement"] == 1.0


def test_reward_model_pairs_and_budget(unit):
    results, _ = unit
    folder = Path(results["online_dpo_sft"].artifact.path)
    pairs = read_jsonl(folder / "pairs.jsonl")
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    budget = results["online_dpo_sft"].metrics
    assert budget["online_dpo/samples"] == budget["online_dpo/prompts"] * 4  # k = 4 in study-smoke
    assert budget["online_dpo/tokens_generated"] > 0


def test_the_reference_is_sft_even_when_starting_from_dpo(unit):
    """At the first step DPO's implicit rewards β·log π/π_ref are 0 when the policy is the reference (start = SFT)
    and not 0 when it starts from the offline-DPO policy: the reference stayed the SFT model."""
    _, trackers = unit
    first = lambda name: next(m for m in trackers[name].logs if "online_dpo/rewards/chosen" in m)  # noqa: E731
    assert first("online_dpo_sft")["online_dpo/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert abs(first("online_dpo_dpo")["online_dpo/rewards/chosen"]) > 1e-6

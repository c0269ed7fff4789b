"""Stage ``online_rl`` on the smoke pipeline's gap task with tiny models: RLOO against the reward model and GRPO
against the gold reward. Weights change, losses are finite, per-step metrics (rewards included) reach the tracker,
the budget is written, the same seed gives the same artifact, the reference TRL builds is the SFT model, and the
reward functions handed to TRL return the right values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from roads.artifacts import read_json, read_jsonl, write_jsonl
from roads.config import StageSpec, load_study
from roads.settings import OnlineRlConfig, TaskConfig
from roads.data.synthetic import SyntheticTask
from roads.errors import ConfigError, DataError
from roads.models import load_policy
from roads.plan import build_plan
from roads.runner import execute
from roads.stages import online_rl
from support import weights

ROOT = Path(__file__).resolve().parents[2]
# the SFT policy is trained a little longer than the smoke default (still ~40 tiny steps) so that its samples earn
# non-zero gold rewards and GRPO gets a real learning signal
OVERRIDES = ["pipeline.tasks=[gap]", "prepare_data.n_sft=32", "prepare_data.n_pairs=32", "sft.epochs=10",
             "sft.batch_size=8"]
SETUP_STAGES = ("prepare_data", "sft", "reward_model")


class RecordingTracker:
    def __init__(self):
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.messages: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def progress(self, message):
        self.messages.append(message)

    def steps_with(self, name: str) -> list[int]:
        return [step for step, m in self.metrics if name in m]


def spec_for(**changes) -> StageSpec:
    params = OnlineRlConfig(epochs=1, batch_size=8, num_generations=4, max_new_tokens=8, n_prompts=16,
                            logging_steps=1, lr=1e-4, **changes).model_dump()
    return StageSpec(stage="online_rl", params=params, seed=0, variant="online_rl", task_name="gap")


def inputs_for(upstream: dict, spec: StageSpec) -> dict:
    inputs = {"data": upstream["prepare_data"].artifact, "reference": upstream["sft"].artifact}
    if spec.params["verifier"] == "reward_model":
        inputs["verifier"] = upstream["reward_model"].artifact
    return inputs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one intra-op thread than on two (thread hand-offs cost more than
    the matrix products), and far faster when other processes compete for the cores; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """prepare_data, sft and reward_model of the gap unit, run once for the module."""
    store = tmp_path_factory.mktemp("store")
    nodes = [n for n in build_plan(load_study(ROOT / "pipelines.yaml", "smoke", OVERRIDES)) if n.stage in SETUP_STAGES]
    results: dict = {}
    for node in nodes:
        results[node.stage] = execute(node.spec, {k: results[v.rsplit("/", 1)[1]].artifact
                                                  for k, v in node.inputs.items()}, store)
    return results


@pytest.fixture(scope="module")
def rloo(upstream, tmp_path_factory):
    spec = spec_for(algorithm="rloo", verifier="reward_model")
    tracker = RecordingTracker()
    result = execute(spec, inputs_for(upstream, spec), tmp_path_factory.mktemp("rloo"), tracker)
    return spec, result, tracker


@pytest.fixture(scope="module")
def grpo(upstream, tmp_path_factory):
    spec = spec_for(algorithm="grpo", verifier="gold")
    tracker = RecordingTracker()
    result = execute(spec, inputs_for(upstream, spec), tmp_path_factory.mktemp("grpo"), tracker)
    return spec, result, tracker


# --------------------------------------------------------------------------- the stage end to end


@pytest.mark.parametrize("algorithm, reward_name", [("rloo", "verifier"), ("grpo", "gold")])
def test_online_rl_trains_and_reports(algorithm, reward_name, upstream, request):
    spec, result, tracker = request.getfixturevalue(algorithm)
    out = Path(result.artifact.path)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    sft = weights(upstream["sft"].artifact.path)
    trained = weights(out)
    assert sft.keys() == trained.keys()
    assert any(not torch.equal(sft[k], trained[k]) for k in sft), "weights did not change"
    assert all(torch.isfinite(t).all() for t in trained.values())

    assert all(math.isfinite(v) for v in result.metrics.values())
    assert f"online_rl/rewards/{reward_name}/mean" in result.metrics
    assert "online_rl/kl" in result.metrics  # β > 0: TRL built the reference and logs KL to it
    budget = read_json(out / "budget.json")
    steps = budget["steps"]
    assert budget["prompts"] == 16 and budget["prompts_dropped"] == 0
    assert steps == 16 * 4 // 8  # 16 prompts × 4 completions, 8 completions per step, one epoch
    assert budget["completions"] == 16 * 4
    assert 16 * 4 <= budget["tokens_generated"] <= 16 * 4 * 8  # 1 to max_new_tokens tokens per completion
    assert result.metrics["online_rl/tokens_generated"] == budget["tokens_generated"]

    # per-step metrics reached the tracker: a loss and the reward at every step
    assert tracker.steps_with("online_rl/loss") == list(range(1, steps + 1))
    assert tracker.steps_with(f"online_rl/rewards/{reward_name}/mean") == list(range(1, steps + 1))
    assert all(math.isfinite(m["online_rl/loss"]) for _, m in tracker.metrics if "online_rl/loss" in m)
    assert any(spec.params["algorithm"] in msg for msg in tracker.messages)


def test_gold_rewards_vary_within_groups(grpo):
    """The SFT policy's samples earn different gold rewards, so GRPO's advantages are not all zero."""
    _, result, tracker = grpo
    rewards = [m["online_rl/rewards/gold/mean"] for _, m in tracker.metrics if "online_rl/rewards/gold/mean" in m]
    assert all(0.0 <= r <= 1.0 for r in rewards)
    assert result.metrics["online_rl/frac_reward_zero_std"] < 1.0


def test_same_seed_same_artifact(rloo, upstream, tmp_path):
    spec, result, _ = rloo
    again = execute(spec, inputs_for(upstream, spec), tmp_path / "store")
    assert again.artifact.digest == result.artifact.digest


# --------------------------------------------------------------------------- TRL wiring


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_trl_reference_is_the_sft_model(algorithm, upstream, tmp_path):
    """TRL rebuilds the reference from ``policy.config._name_or_path``: it must be the SFT folder's weights."""
    sft_path = upstream["sft"].artifact.path
    cfg = OnlineRlConfig(algorithm=algorithm, beta=0.1, batch_size=8, num_generations=4)
    policy, tokenizer = load_policy(sft_path)
    trainer = online_rl.build_trainer(cfg, online_rl.rl_config(cfg, 0, str(tmp_path)), policy, tokenizer,
                                      ["sort: a b ->"], lambda prompts, completions, **kw: [0.0] * len(prompts))
    assert trainer.ref_model is not None and trainer.ref_model is not policy
    assert Path(trainer.ref_model.config._name_or_path) == Path(sft_path)
    ref = dict(trainer.ref_model.named_parameters())
    for name, tensor in weights(sft_path).items():
        assert torch.equal(ref[name].detach(), tensor), name


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_rl_config_drops_max_length_and_rounds_the_batch(algorithm, tmp_path):
    cfg = OnlineRlConfig(algorithm=algorithm, batch_size=6, num_generations=4, beta=0.2, max_new_tokens=5,
                         temperature=0.7)
    args = online_rl.rl_config(cfg, 3, str(tmp_path))
    assert type(args).__name__ == ("RLOOConfig" if algorithm == "rloo" else "GRPOConfig")
    assert not hasattr(args, "max_length")
    assert args.per_device_train_batch_size == 8
    assert args.generation_batch_size % args.num_generations == 0
    assert (args.beta, args.num_generations, args.max_completion_length, args.temperature, args.seed) == (
        0.2, 4, 5, 0.7, 3)


def test_group_batch_size():
    assert [online_rl.group_batch_size(b, 4) for b in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert online_rl.group_batch_size(7, 7) == 7


# --------------------------------------------------------------------------- reward functions and prompts


def test_gold_reward_function_scores_the_target_as_one():
    task = TaskConfig(family="gap", alphabet=8, min_len=4, max_len=8)
    reward = online_rl.gold_reward_func(task)
    synthetic = SyntheticTask("gap", 8, 4, 8)
    prompt = synthetic.prompt(list("dbca"))
    target = synthetic.response(synthetic.target(list("dbca")))
    assert target == " a b c d"
    got = reward(prompts=[prompt, prompt], completions=[target, " d c"], completion_ids=[[1], [2]], trainer_state=None)
    assert got == [1.0, synthetic.gold_reward(prompt, " d c")] and got[1] < 1.0
    assert reward.__name__ == "gold"


def test_gold_reward_needs_a_synthetic_task():
    with pytest.raises(ConfigError, match="verifier"):
        online_rl.gold_reward_func(TaskConfig(family="preferences", source="x.jsonl"))


def test_reward_model_function_matches_reward_scores(upstream):
    from roads.generation import reward_scores
    from roads.models import load_reward_model

    path = upstream["reward_model"].artifact.path
    reward = online_rl.reward_model_func(path)
    assert reward.__name__ == "verifier"
    prompts, completions = ["sort: b a ->", "sort: b a ->"], [" a b", " b"]
    model, tokenizer = load_reward_model(path)
    expected = reward_scores(model, tokenizer, prompts, completions).tolist()
    assert reward(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3]]) == pytest.approx(expected)


def test_counting_counts_completions_and_tokens():
    counts = {"completions": 0, "tokens_generated": 0}

    def base(prompts, completions, **kw):
        return [1.0] * len(prompts)

    base.__name__ = "gold"
    reward = online_rl.counting(base, counts)
    assert reward.__name__ == "gold"
    assert reward(prompts=["p", "q"], completions=["a", "b"], completion_ids=[[1, 2, 3], [4]]) == [1.0, 1.0]
    reward(prompts=["p"], completions=["a"], completion_ids=[[5, 6]])
    assert counts == {"completions": 3, "tokens_generated": 6}


def test_training_prompts_unique_in_order_limited_and_length_checked(upstream, tmp_path):
    _, tokenizer = load_policy(upstream["sft"].artifact.path)
    rows = [{"prompt": p, "chosen": " a", "rejected": " b"}
            for p in ["sort: b a ->", "sort: c a ->", "sort: b a ->", "sort: " + "a " * 40 + "->", "sort: d a ->"]]
    write_jsonl(tmp_path / "pairs_train.jsonl", rows)
    cfg = OnlineRlConfig(max_length=32, max_new_tokens=8)
    prompts, dropped = online_rl.training_prompts(tmp_path, tokenizer, cfg)
    assert prompts == ["sort: b a ->", "sort: c a ->", "sort: d a ->"] and dropped == 1
    limited, _ = online_rl.training_prompts(tmp_path, tokenizer, cfg.model_copy(update={"n_prompts": 2}))
    assert limited == ["sort: b a ->", "sort: c a ->"]
    with pytest.raises(DataError, match="max_length"):
        online_rl.training_prompts(tmp_path, tokenizer, OnlineRlConfig(max_length=9, max_new_tokens=8))


def test_training_prompts_of_the_real_data(upstream):
    data = Path(upstream["prepare_data"].artifact.path)
    _, tokenizer = load_policy(upstream["sft"].artifact.path)
    prompts, dropped = online_rl.training_prompts(data, tokenizer, OnlineRlConfig())
    expected = list(dict.fromkeys(r["prompt"] for r in read_jsonl(data / "pairs_train.jsonl")))
    assert prompts == expected and dropped == 0


def test_lora_online_rl_trains_the_adapter_against_the_sft_reference(upstream, tmp_path):
    """model.lora: RLOO trains adapters on the frozen SFT policy; TRL's reference is the frozen copy of the fresh
    adapter (no second model), which is exactly the SFT policy; the merged weights and the adapter are saved."""
    from peft import PeftModel

    from roads.lora import with_lora
    from roads.settings import LoraConfig

    lora = LoraConfig(rank=4)
    sft_path = upstream["sft"].artifact.path
    cfg = OnlineRlConfig(beta=0.1, batch_size=8, num_generations=4)
    policy, tokenizer = load_policy(sft_path)
    trainer = online_rl.build_trainer(cfg, online_rl.rl_config(cfg, 0, str(tmp_path / "scratch")),
                                      with_lora(policy, lora, 0), tokenizer, ["sort: a b ->"],
                                      lambda prompts, completions, **kw: [0.0] * len(prompts))
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config

    spec = spec_for(algorithm="rloo", verifier="gold").model_copy(update={"lora": lora})
    result = execute(spec, inputs_for(upstream, spec), tmp_path / "store", RecordingTracker())
    out = Path(result.artifact.path)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved, sft = weights(out), weights(sft_path)
    assert any(not torch.equal(sft[k], saved[k]) for k in sft), "weights did not change"
    rebuilt = PeftModel.from_pretrained(load_policy(sft_path)[0], str(out / "adapter")).merge_and_unload().state_dict()
    for name, tensor in saved.items():  # frozen base + the adapter alone
        torch.testing.assert_close(tensor, rebuilt[name], rtol=0, atol=1e-6)
    assert result.metrics["online_rl/examples_trained"] == 16 and result.metrics["online_rl/dropped_too_long"] == 0

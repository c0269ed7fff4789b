"""LoRA (model.lora): the stages train adapters on a frozen base, save the adapter and the merged weights, count the
setting in their cache key, and DPO's reference stays exactly the SFT policy. Tiny models built from config."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from roads.settings import LoraConfig, ModelConfig, OfflineDpoConfig, RewardModelConfig, SftConfig
from support import weights

LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def rows():
    from roads.data.synthetic import SyntheticTask, generate
    from roads.models import build_tokenizer

    data = generate(SyntheticTask("gap"), seed=0, n_sft=64, n_pairs=16, n_val_pairs=1, n_eval_prompts=1,
                    demo_noise=0.3, behaviour_noise=0.5, bt_temperature=0.1)
    corpus = ([r["prompt"] + r["completion"] for r in data["sft"]]
              + [r["prompt"] + r["chosen"] + r["rejected"] for r in data["pairs_train"]])
    return data["sft"], data["pairs_train"], build_tokenizer(corpus)


@pytest.fixture(scope="module")
def start(rows, tmp_path_factory):
    """A saved tiny policy (the 'SFT policy' the LoRA stages start from)."""
    from roads.models import new_causal_lm

    path = tmp_path_factory.mktemp("start")
    new_causal_lm("tiny", rows[2], seed=0).save_pretrained(path)
    rows[2].save_pretrained(path)
    return path


def _adapter(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


def _rebuilt(base, out_dir) -> dict[str, torch.Tensor]:
    """The untouched base with the saved adapter merged in: equal to the saved model iff only the adapter trained."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(out_dir / "adapter")).merge_and_unload().state_dict()


def _assert_only_adapter_trained(saved: dict, rebuilt: dict, before: dict):
    assert any(not torch.equal(saved[k], before[k]) for k in saved), "the saved weights did not change"
    for k in saved:  # saved = frozen base + B·A, exactly what the adapter alone gives
        torch.testing.assert_close(saved[k], rebuilt[k], rtol=0, atol=1e-6)


def test_lora_sft_trains_the_adapter_and_leaves_the_base_frozen(rows, tmp_path):
    from roads.models import new_causal_lm
    from roads.sft_trainer import train_sft
    from roads.training import NullTracker

    sft, _, tokenizer = rows
    model = new_causal_lm("tiny", tokenizer, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_sft("sft", SftConfig(epochs=1, batch_size=8, lr=1e-2), 0, model, tokenizer, sft, tmp_path,
                        NullTracker(), lora=LORA)
    adapter = _adapter(tmp_path)
    assert any("lora_B" in k for k in adapter) and all(float(v.abs().max()) > 0 for k, v in adapter.items()
                                                       if "lora_B" in k)  # B starts at zero: it trained
    saved = weights(tmp_path)
    assert not any("lora" in k for k in saved)  # the stage folder holds plain merged weights
    base = new_causal_lm("tiny", tokenizer, seed=0)
    _assert_only_adapter_trained(saved, _rebuilt(base, tmp_path), before)
    assert metrics["sft/examples_trained"] == len(sft)


def test_lora_reward_model_trains_adapter_and_head_on_a_frozen_base(rows, start, tmp_path):
    from roads.models import reward_model_from_policy
    from roads.stages.reward_model import _train
    from roads.training import NullTracker, save_trained

    _, pairs, _ = rows
    model, tokenizer, trainer = _train(RewardModelConfig(epochs=1, batch_size=8, lr=1e-2), 0, str(start), pairs,
                                       NullTracker(), LORA)
    save_trained("reward_model", model, tokenizer, trainer, tmp_path)
    adapter = _adapter(tmp_path)
    assert any("score" in k for k in adapter)  # the scalar head trains in full (modules_to_save)
    base, _ = reward_model_from_policy(str(start), seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    _assert_only_adapter_trained(weights(tmp_path), _rebuilt(base, tmp_path), before)


def _batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_lora_dpo_reference_is_exactly_the_sft_policy(rows, start, tmp_path):
    """TRL's reference under LoRA (a frozen copy of the fresh adapter) gives the SFT policy's log-probs — before and
    after the adapter trained — as the full fine-tuning path's reference loaded from disk does."""
    from trl import DPOConfig

    from roads.lora import with_lora
    from roads.models import load_policy
    from roads.reference import SharedReferenceDPOTrainer
    from roads.training import trainer_args
    from datasets import Dataset

    _, pairs, tokenizer = rows
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs])
    cfg = OfflineDpoConfig(epochs=2, batch_size=8, lr=5e-2)

    def trainer(model, ref_model, out):
        args = DPOConfig(**trainer_args(cfg, 0, str(out), beta=0.1, precompute_ref_log_probs=False))
        return SharedReferenceDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data,
                                         processing_class=tokenizer)

    full = trainer(load_policy(start)[0], load_policy(start)[0], tmp_path / "full")
    lora = trainer(with_lora(load_policy(start)[0], LORA, 0), None, tmp_path / "lora")
    assert lora.ref_model is None and "ref" in lora.model.peft_config  # no second copy of the model in memory
    batch = _batch(full)
    expected = full.compute_ref_log_probs(full.model, batch)
    torch.testing.assert_close(lora.compute_ref_log_probs(lora.model, batch), expected, rtol=0, atol=1e-6)
    lora.train()
    trained = {k: v for k, v in lora.model.named_parameters() if "lora_B" in k and ".default." in k}
    assert trained and any(float(v.abs().max()) > 0 for v in trained.values())
    torch.testing.assert_close(lora.compute_ref_log_probs(lora.model, batch), expected, rtol=0, atol=1e-6)


def test_lora_dpo_stage_trains_and_saves_merged_weights(rows, start, tmp_path):
    from roads.dpo_trainer import train_dpo
    from roads.models import load_policy
    from roads.training import NullTracker

    _, pairs, _ = rows
    before = weights(start)
    metrics = train_dpo("offline_dpo", OfflineDpoConfig(epochs=1, batch_size=8, lr=5e-2), 0, str(start), pairs,
                        tmp_path, NullTracker(), beta=0.1, loss_type="sigmoid", precompute_ref=True, lora=LORA)
    _assert_only_adapter_trained(weights(tmp_path), _rebuilt(load_policy(start)[0], tmp_path), before)
    assert metrics["offline_dpo/examples_trained"] == len(pairs)
    assert (tmp_path / "displacement.json").is_file()


def test_lora_is_in_the_cache_key_of_the_lora_stages_only(pipelines_file):
    from roads.config import load_study
    from roads.plan import build_plan

    plain = {n.id: n.spec.fingerprint() for n in build_plan(load_study(pipelines_file, "default"))}
    lora = build_plan(load_study(pipelines_file, "default", overrides=["model.lora.rank=4"]))
    for node in lora:
        moved = node.spec.fingerprint() != plain[node.id]
        trains = node.spec.stage in ("sft", "reward_model", "offline_dpo", "online_dpo", "select_dpo", "online_rl")
        assert moved == trains, node.id  # later stages see LoRA's effect through their inputs' digests
    assert all(n.spec.lora == LoraConfig(rank=4) for n in lora if n.spec.stage == "sft")
    assert ModelConfig().lora is None

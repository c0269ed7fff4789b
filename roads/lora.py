"""LoRA through peft, for the stages in ``roads.stage_table.LORA_STAGES`` when ``model.lora`` is set.

A stage wraps the model it loaded (:func:`with_lora`: frozen base, fresh adapters drawn from the stage's seed, so the
same seed gives the same run) and hands the ``PeftModel`` to TRL. At the end :func:`merge_for_saving` saves the
adapter to ``adapter/`` and merges it into the weights; the stage's folder holds the merged model, a plain
``save_pretrained`` folder, so every later stage, the sampler, evaluate and vLLM load it as before.

**The reference stays exactly the policy before the stage.** TRL (1.16) given a ``PeftModel`` and no ``ref_model``
(DPOTrainer, RLOOTrainer, GRPOTrainer) adds a frozen copy of the fresh adapter named ``ref`` and computes reference
log-probs with it active (``use_adapter(model, "ref")``). A fresh LoRA adapter has B = 0, so its update B·A is exactly
zero and the reference is the loaded base: the merged SFT policy, bit for bit (tests/unit/test_lora.py compares the
log-probs). Where the reference is *not* the start policy (online DPO's later rounds, or from offline DPO), the
reference is loaded from its folder and passed as ``ref_model``, as without LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from roads.settings import LoraConfig

ADAPTER_DIR = "adapter"  # inside a stage's folder: the trained LoRA adapter (peft's save_pretrained)


def with_lora(model, lora: LoraConfig | None, seed: int, task_type: str = "CAUSAL_LM"):
    """``model`` with LoRA adapters (the base frozen), or ``model`` itself when ``lora`` is None. ``task_type``
    SEQ_CLS (the reward model) also trains the scalar head in full (peft's modules_to_save ``score``). The adapters'
    A matrices are drawn from ``seed``; the process's global generator is left as it was."""
    if lora is None:
        return model
    import peft

    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
        target_modules=lora.target_modules[0] if lora.target_modules == ["all-linear"] else list(lora.target_modules),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def is_lora(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def merge_for_saving(model, out_dir: str | Path):
    """For a LoRA model: save its adapter to ``out_dir/adapter`` and return the base with the adapter merged in (what
    the stage saves); any other model is returned as it is."""
    if not is_lora(model):
        return model
    # TRL's DPO and RLOO/GRPO add a frozen copy named "ref" (the reference): only the trained "default" is kept
    model.save_pretrained(str(Path(out_dir) / ADAPTER_DIR), selected_adapters=["default"])
    return model.merge_and_unload(adapter_names=["default"])


def plain(model):
    """The underlying transformers model of a (merged) LoRA model; any other model as it is."""
    return model.get_base_model() if is_lora(model) else model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Per-model defaults: what a run on pretrained weights (``model.pretrained`` set) uses where the user does not say.

The ``defaults`` section of ``pipelines.yaml`` is written for the presets, tiny models trained from scratch (SFT at a
learning rate of 1e-3, sequences of 64 tokens). Pretrained weights want learning rates 10–100x smaller, and real
conversations are longer than 64 tokens. So when ``model.pretrained`` is set by a pipeline's ``set`` or by ``--set``
(not by the file's own ``defaults``, which are then written for that model), every key of :func:`model_defaults`
that neither the pipeline's ``set`` nor ``--set`` names takes the per-model value:

- learning rates (:data:`PRETRAINED_LRS`): full fine-tuning, or — with ``model.lora`` — LoRA's larger ones;
- ``max_length`` of the stages that train on the task's sequences (:data:`LENGTH_STAGES`), from the data: the 95th
  percentile of prompt + longer response + EOS in tokens of the model's own tokenizer (through its chat template where
  prepare_data renders one) over the records the task keeps, rounded up to a multiple of 32 and at most the model's
  context; for local preference files only (a hub dataset or a synthetic task keeps the section's value).

Each value lands in the resolved settings, so it is in the fingerprint and the cache key like any other, and ``roads
show`` prints it with the reason (``model_defaults``). Runs without ``model.pretrained`` are untouched: the presets'
fingerprints do not move.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from roads.errors import RoadsError

# stage.key -> (full fine-tuning, LoRA): learning rates for pretrained weights (online_dpo takes offline_dpo's)
PRETRAINED_LRS: dict[str, tuple[Any, Any]] = {
    "sft.lr": (3.0e-5, 2.0e-4),
    "sft_chosen.lr": (1.0e-5, 1.0e-4),
    "reward_model.lr": (2.0e-5, 1.0e-4),
    "local_rm.lr": (1.0e-5, 1.0e-4),
    "offline_dpo.lr": (1.0e-5, 1.0e-4),
    "select_dpo.lrs": ([5.0e-6, 2.0e-5], [5.0e-5, 2.0e-4]),
    "online_rl.lr": (1.0e-5, 1.0e-4),
    "q_sft.lr": (1.0e-5, 1.0e-4),
    "genrm.lr": (1.0e-5, 1.0e-4),
}
# the stages whose max_length bounds the task's prompt + response (online_rl's bounds prompt + max_new_tokens, genrm
# sets its own, ivl trains a value network of its own)
LENGTH_STAGES = ("sft", "sft_chosen", "reward_model", "local_rm", "offline_dpo", "online_dpo", "select_dpo", "q_sft")
LENGTH_QUANTILE = 0.95
LENGTH_STEP = 32


def _named(key: str, explicit: set[str]) -> bool:
    """``key`` (``sft.lr``) or a section above it (``sft``) was set by the user."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def model_defaults(model: dict, tasks: dict[str, dict], explicit: set[str]) -> dict[str, tuple[Any, str]]:
    """key -> (value, why) for a study whose model section is ``model`` (a dict) on ``tasks`` (name -> task dict), the
    keys in ``explicit`` (the pipeline's ``set`` and ``--set``) left alone. Empty without ``model.pretrained``."""
    if not model.get("pretrained"):
        return {}
    lora = model.get("lora") is not None
    out: dict[str, tuple[Any, str]] = {}
    for key, (full, with_lora) in PRETRAINED_LRS.items():
        if not _named(key, explicit):
            out[key] = (with_lora if lora else full,
                        f"pretrained weights{' with LoRA' if lora else ', full fine-tuning'}")
    try:
        lengths = [(name, data_length(model["pretrained"], task)) for name, task in tasks.items()]
    except (RoadsError, OSError, ValueError):  # the model or the file cannot be read here: the preflight says why
        lengths = []
    lengths = [(name, n) for name, n in lengths if n is not None]
    if lengths:
        name, longest = max(lengths, key=lambda x: x[1])
        why = (f"from the data: {LENGTH_QUANTILE:.0%} of task {name!r}'s prompt + response fit in {longest} tokens of "
               "the model's tokenizer")
        for stage in LENGTH_STAGES:
            if not _named(f"{stage}.max_length", explicit):
                out[f"{stage}.max_length"] = (longest, why)
    return out


def data_length(pretrained: str, task: dict) -> int | None:
    """The per-model ``max_length`` for a local preference file (None for anything else)."""
    source = task.get("source")
    if task.get("family") != "preferences" or not source:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        return None  # a hub dataset: its lengths are not known before prepare_data reads it
    stat = path.stat()
    return _data_length(pretrained, str(path.resolve()), stat.st_size, stat.st_mtime_ns, task.get("format", "auto"),
                        task.get("split", "train"), task.get("limit"), task.get("chat_template", "auto"))


@lru_cache(maxsize=16)
def _data_length(pretrained: str, source: str, size: int, mtime: int, format: str, split: str, limit: int | None,
                 chat_template: str) -> int:
    from roads.data.preferences import load_preferences
    from roads.models import load_tokenizer
    from roads.data.chat import chat_templated

    tokenizer = load_tokenizer(pretrained)
    rows = list(load_preferences(source, format=format, split=split, limit=limit))
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        rows = chat_templated({"rows": rows}, tokenizer)["rows"]  # as prepare_data renders them
    sizes = sorted(len(tokenizer(r["prompt"] + max(r["chosen"], r["rejected"], key=len), add_special_tokens=False)
                       ["input_ids"]) + 1 for r in rows)
    if not sizes:
        return LENGTH_STEP
    at = sizes[min(len(sizes) - 1, math.ceil(LENGTH_QUANTILE * len(sizes)) - 1)]
    length = LENGTH_STEP * math.ceil(at / LENGTH_STEP)
    context = _context(tokenizer)
    return min(length, context) if context else length


def _context(tokenizer) -> int | None:
    """The model's context length, from its config (max_position_embeddings), else the tokenizer's, if sensible."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(tokenizer.name_or_path)  # the folder the tokenizer was loaded from
        context = getattr(config, "max_position_embeddings", None)
        if context:
            return int(context)
    except (OSError, ValueError):
        pass
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else None

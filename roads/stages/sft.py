"""sft: supervised fine-tuning on the demonstrations with TRL's SFTTrainer (loss on the completion only).

Builds the policy from scratch (a byte-level BPE tokenizer trained on the task text and a tiny Llama preset) or
starts from ``model.pretrained``. The result is the reference policy of every later stage. Output: the model and
tokenizer (``save_pretrained``); with ``select: val_nll`` the epoch with the lowest held-out NLL on the data's
``sft_val.jsonl`` and ``selection.json`` (the curve and the choice).

For a synthetic task with ``response_vocab: task`` the policy may sample only the tokens made of the task's response
symbols (and EOS): the others are its ``generation_config.suppress_tokens``, saved with it and kept by every policy
trained from it. ``sft/suppressed_mass``: the probability the trained policy puts on those tokens per response position
of the held-out demonstrations (``sft_val.jsonl``, else ``sft.jsonl``).
"""

from __future__ import annotations

from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, read_jsonl
from roads.config import StageSpec
from roads.settings import SftConfig
from roads.data import synthetic_task, task_of
from roads.models import (build_tokenizer, count_parameters, load_pretrained, new_causal_lm, outside_response_vocab,
                          restrict_vocab, suppressed_mass)
from roads.sft_trainer import train_sft
from roads.training import NullTracker, Tracker

VERSION = 1


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: SftConfig = spec.config()
    data = Path(inputs["data"].path)
    rows = read_jsonl(data / "sft.jsonl")
    if spec.model.pretrained:
        model, tokenizer = load_pretrained(spec.model.pretrained)
    else:
        pairs = read_jsonl(data / "pairs_train.jsonl")
        corpus = [r["prompt"] + r["completion"] for r in rows] + [r["prompt"] + r["chosen"] + r["rejected"] for r in pairs]
        tokenizer = build_tokenizer(corpus, vocab_size=spec.model.vocab_size)
        model = new_causal_lm(cfg.preset or spec.model.preset, tokenizer, seed=spec.seed, max_positions=max(256, cfg.max_length))
    task = task_of(data)[1]
    synthetic = synthetic_task(task)
    if synthetic is not None:  # response_vocab 'task': saved in generation_config.json, inherited by later policies
        outside = (restrict_vocab(model, tokenizer, synthetic.response_symbols) if task.response_vocab == "task"
                   else outside_response_vocab(model, tokenizer, synthetic.response_symbols))
    tracker.progress(f"{count_parameters(model):,} parameters, {len(rows)} demonstrations")
    val = data / "sft_val.jsonl"
    val_rows = read_jsonl(val) if cfg.select == "val_nll" and val.is_file() else None
    metrics = train_sft("sft", cfg, spec.seed, model, tokenizer, rows, out_dir, tracker, val_rows=val_rows or None,
                        patience=cfg.patience, lora=spec.lora)
    metrics["sft/parameters"] = float(count_parameters(model))
    if synthetic is not None:  # the mass sampling drops (under response_vocab 'all': the mass it keeps)
        held_out = read_jsonl(val) if val.is_file() else rows
        metrics["sft/suppressed_mass"] = suppressed_mass(model, tokenizer, held_out, outside)
    return StageResult(metrics=metrics, files=[])

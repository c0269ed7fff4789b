"""Peak memory (RSS) of LoRA against full fine-tuning, in the same session: offline DPO (roads.dpo_trainer.train_dpo,
the stage function) — or SFT (``--stage sft``) — on the same pairs, once with full fine-tuning and once with
``model.lora``, each in a fresh child process so that each peak is its own (a process's peak RSS never falls).

Full fine-tuning DPO holds the policy, its gradients and AdamW's two moments, and a second copy as the reference
(``--precompute-ref`` computes the reference's log-probs before training, then frees it); LoRA holds one frozen copy,
the adapters' gradients and moments, and no reference copy (TRL's reference is the frozen fresh adapter).

The model: by default a Llama built from config (``--hidden``, ``--layers``; a byte-level BPE of the task text, no
download); ``--pretrained PATH`` a local folder (``roads model fetch smollm2-135m`` puts SmolLM2-135M in
``~/.cache/roads/models/smollm2-135m``). Run a 135M model under the machine's lock:

    python bench/lora_memory.py [--stage dpo|sft] [--pretrained PATH] [--pairs 32] [--batch 8] [--max-length 64]
    flock /tmp/roads-135m.lock python bench/lora_memory.py --pretrained ~/.cache/roads/models/smollm2-135m

``--compare precision`` runs the same stage twice with LoRA (``--full``: full fine-tuning), in float32 and under
``launch.mixed_precision: bf16`` in the stage's own process (roads.training.mixed_precision, as the runner applies it),
and reports the time and peak of bf16 against float32, and how far the final training losses are apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> None:
    """One variant in this process: build the start policy, train, print a JSON line with the peaks."""
    import torch

    from roads.data.synthetic import SyntheticTask, generate
    from roads.models import build_tokenizer, load_pretrained, new_causal_lm
    from roads.settings import LoraConfig, OfflineDpoConfig, SftConfig
    from roads.training import NullTracker

    torch.set_num_threads(args.threads)
    data = generate(SyntheticTask("gap"), seed=0, n_sft=args.pairs, n_pairs=args.pairs, n_val_pairs=1,
                    n_eval_prompts=1, demo_noise=0.3, behaviour_noise=0.5, bt_temperature=0.1)
    work = Path(args.work)
    start = work / "start"
    if args.pretrained:
        model, tokenizer = load_pretrained(args.pretrained)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in data["pairs_train"]]
        tokenizer = build_tokenizer(corpus)
        base = new_causal_lm("tiny", tokenizer, seed=0)
        config = LlamaConfig(**{**base.config.to_dict(), "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                                "intermediate_size": int(args.hidden * 2.6875), "num_attention_heads": 8,
                                "num_key_value_heads": 8})
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    loaded = _rss_mib()
    from roads.training import mixed_precision

    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank) if args.variant == "lora" else None
    common = dict(epochs=1, batch_size=args.batch, max_length=args.max_length, lr=1e-5, logging_steps=1000,
                  max_dropped_fraction=1.0)
    began = time.perf_counter()
    with mixed_precision(args.precision):
        if args.stage == "dpo":
            from roads.dpo_trainer import train_dpo

            metrics = train_dpo("offline_dpo", OfflineDpoConfig(**common), 0, str(start), data["pairs_train"],
                                work / "out", NullTracker(), beta=0.1, loss_type="sigmoid",
                                precompute_ref=args.precompute_ref, lora=lora)
        else:
            from roads.models import load_policy
            from roads.sft_trainer import train_sft

            model, tokenizer = load_policy(start)
            metrics = train_sft("sft", SftConfig(**common, select="last"), 0, model, tokenizer, data["sft"],
                                work / "out", NullTracker(), lora=lora)
    seconds = time.perf_counter() - began
    loss = next((v for k, v in metrics.items() if k.endswith("/train_loss")), float("nan"))
    print(json.dumps({"variant": args.variant, "precision": args.precision, "parameters": parameters,
                      "peak_rss_mib": round(_rss_mib(), 1), "peak_rss_before_training_mib": round(loaded, 1),
                      "train_s": round(seconds, 2), "train_loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("dpo", "sft"), default="dpo")
    parser.add_argument("--pretrained", default=None, help="a local model folder (default: a Llama built from config)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--precompute-ref", action="store_true", help="dpo: reference log-probs once, before training")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    parser.add_argument("--compare", choices=("lora", "precision"), default="lora",
                        help="lora: LoRA against full fine-tuning; precision: bf16 autocast against float32")
    parser.add_argument("--full", action="store_true", help="--compare precision: full fine-tuning (default LoRA)")
    parser.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("no", "bf16"), default="no", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    os.chdir(ROOT)
    tuned = "full" if args.full else "lora"
    runs = [("full", "no"), ("lora", "no")] if args.compare == "lora" else [(tuned, "no"), (tuned, "bf16")]
    rows = []
    for variant, precision in runs:
        with tempfile.TemporaryDirectory(prefix="roads-bench-lora-") as work:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "ROADS_HOME": str(Path(work) / "home"),
                   "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--precision", precision,
                   "--work", work]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    model = args.pretrained or f"config-built Llama (hidden {args.hidden}, {args.layers} layers)"
    if args.compare == "precision":
        fp32, bf16 = rows
        print(f"{args.stage} on {model}, {fp32['parameters'] / 1e6:.1f}M parameters, {tuned}, {args.pairs} examples, "
              f"batch {args.batch}, max_length {args.max_length}, {args.threads} thread(s)")
        print(f"time: float32 {fp32['train_s']:.1f} s, bf16 {bf16['train_s']:.1f} s: bf16 / float32 = "
              f"{bf16['train_s'] / fp32['train_s']:.2f}; peak RSS bf16 / float32 = "
              f"{bf16['peak_rss_mib'] / fp32['peak_rss_mib']:.2f}; final train loss {fp32['train_loss']:.4f} vs "
              f"{bf16['train_loss']:.4f}")
        return
    full, lora = rows
    print(f"{args.stage} on {model}, {full['parameters'] / 1e6:.1f}M parameters, {args.pairs} examples, batch "
          f"{args.batch}, max_length {args.max_length}, LoRA rank {args.rank}")
    print(f"peak RSS: full fine-tuning {full['peak_rss_mib']:.0f} MiB, LoRA {lora['peak_rss_mib']:.0f} MiB: "
          f"LoRA / full = {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}")
    grow_full = full["peak_rss_mib"] - full["peak_rss_before_training_mib"]
    grow_lora = lora["peak_rss_mib"] - lora["peak_rss_before_training_mib"]
    print(f"training's own growth (peak − the peak before training: building, saving the start): full {grow_full:.0f} MiB, LoRA {grow_lora:.0f} MiB "
          f"({grow_lora / grow_full:.2f}); time full {full['train_s']:.1f} s, LoRA {lora['train_s']:.1f} s")


if __name__ == "__main__":
    main()

"""Generation throughput of the online stage's sampler against TRL's own generation path, measured in one run.

Both paths sample completions for the same batch of left-padded prompts, from the same model (a freshly initialised
preset on a tokenizer trained on the synthetic ``gap`` task's text), with the same ``max_new_tokens`` and
temperature, sampling on:

(a) roads: :func:`roads.generation.sample` (``n=1``), what ``online_dpo`` calls each round — a hand-written decode
    loop over the KV cache with an explicit ``torch.Generator``; it includes encoding the prompts and decoding the
    completions to text.
(b) TRL: what TRL 1.16's GRPO (and RLOO) trainer does when it generates without vLLM and without continuous
    batching, which is what ``online_rl`` runs. It mirrors ``trl/trainer/grpo_trainer.py``:
      * lines 1155-1173: ``GenerationConfig(max_new_tokens=max_completion_length, do_sample=True, pad_token_id,
        bos_token_id, eos_token_id=[eos ids], temperature, top_p, top_k, min_p, repetition_penalty,
        cache_implementation, disable_compile=True)``, here with GRPOConfig's defaults for the settings roads does not
        set (top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, cache_implementation=None) and
        ``temperature``/``max_new_tokens`` as given;
      * line 1758: prompts tokenised with ``processing_class(text=prompts)["input_ids"]``;
      * lines 1815-1828: TRL's ``pad`` (left, ``pad_to_multiple_of`` None off Neuron) of ids and attention mask;
      * lines 1860-1875: ``unwrapped_model.generate(**generate_inputs, generation_config=...)`` under ``no_grad``;
      * lines 1877-1888: completions cut after the prompt and masked after the first EOS, then ``.tolist()``.
    The RLOO trainer builds the same GenerationConfig (rloo_trainer.py 785-805) and calls generate the same way.
    Text decoding (``batch_decode`` in ``_generate``, line 2247) is included as in (a), so both produce token ids
    and text.

Tokens generated are counted per path, not assumed: for roads the sum of ``len(c.ids)`` (EOS included), for TRL the
non-pad tokens after the prompt up to and including the first EOS. A random model rarely emits EOS, so both usually
generate the full ``max_new_tokens``. Each path is warmed up once, then ``repeats`` timed runs are interleaved
(roads, TRL, roads, TRL, …) so a machine whose load changes affects both alike; medians are reported. Before every
TRL run the global generator is seeded (``torch.manual_seed``), as TRL's ``set_seed`` does; roads takes the seed.
The table also gives each path's range of tokens/s over the repeats: on a machine where other processes compete for
the cores, torch's default of one thread per core can make both paths many times slower and the ratio meaningless
(a wide range shows it); run with ``--threads 1`` (or fewer threads than idle cores) there.

    python bench/generation.py [--preset small] [--prompts 256] [--batch-size 256] [--max-new-tokens 16]
                               [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str, n_prompts: int, seed: int):
    """The tokenizer (trained on the gap task's SFT and preference text, as the sft stage does), a fresh model of
    ``preset`` and ``n_prompts`` distinct gap prompts."""
    from roads.data.synthetic import SyntheticTask, generate
    from roads.models import build_tokenizer, new_causal_lm

    task = SyntheticTask("gap", alphabet=8, min_len=4, max_len=8)
    data = generate(task, seed=seed, n_sft=1000, n_pairs=500, n_val_pairs=0, n_eval_prompts=n_prompts,
                    demo_noise=0.1, behaviour_noise=0.3, bt_temperature=0.1)
    corpus = [r["prompt"] + r["completion"] for r in data["sft"]]
    corpus += [r["prompt"] + r["chosen"] + r["rejected"] for r in data["pairs_train"]]
    tokenizer = build_tokenizer(corpus)
    model = new_causal_lm(preset, tokenizer, seed=seed)
    model.eval()
    return tokenizer, model, [r["prompt"] for r in data["eval_prompts"]]


def roads_path(model, tokenizer, prompts, *, max_new_tokens, temperature, seed, batch_size):
    """(sequences, tokens generated) of one call of the online stage's sampler."""
    from roads.generation import sample

    groups = sample(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=temperature,
                    seed=seed, batch_size=batch_size)
    return sum(len(g) for g in groups), sum(len(c.ids) for g in groups for c in g)


def trl_generation_config(tokenizer, model, *, max_new_tokens, temperature):
    """The GenerationConfig GRPOTrainer builds (grpo_trainer.py 1155-1173), with GRPOConfig's field defaults."""
    from transformers import GenerationConfig
    from trl import GRPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    eos_ids = model.generation_config.eos_token_id  # grpo_trainer.py 409-416
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if tokenizer.eos_token_id not in eos_ids:
        eos_ids = [tokenizer.eos_token_id, *eos_ids]
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_ids,
        "temperature": temperature,
        "top_p": defaults["top_p"],
        "top_k": defaults["top_k"],
        "min_p": defaults["min_p"],
        "repetition_penalty": defaults["repetition_penalty"],
        "cache_implementation": defaults["cache_implementation"],
    }
    return GenerationConfig(**kwargs, disable_compile=True), eos_ids


def trl_path(model, tokenizer, prompts, *, generation_config, eos_ids, seed, batch_size):
    """(sequences, tokens generated) of TRL's transformers generation path over the same batches."""
    import torch
    from trl.trainer.utils import pad

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    sequences = tokens = 0
    for start in range(0, len(prompts), batch_size):
        prompt_ids = tokenizer(text=prompts[start:start + batch_size])["input_ids"]
        prompt_tensors = [torch.tensor(ids) for ids in prompt_ids]
        padded_ids = pad(prompt_tensors, padding_value=tokenizer.pad_token_id, padding_side="left")
        attention_mask = pad([torch.ones_like(t) for t in prompt_tensors], padding_value=0, padding_side="left")
        generate_inputs = {"input_ids": padded_ids.to(device), "attention_mask": attention_mask.to(device)}
        with torch.no_grad():
            prompt_completion_ids = model.generate(**generate_inputs, generation_config=generation_config)
        completion_ids = prompt_completion_ids[:, generate_inputs["input_ids"].size(1):]
        is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device))
        eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
        eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
        sequence_indices = torch.arange(is_eos.size(1), device=device).expand(is_eos.size(0), -1)
        completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
        completions = [c[m].tolist() for c, m in zip(completion_ids.cpu(), completion_mask.bool().cpu(), strict=True)]
        tokenizer.batch_decode(completions, skip_special_tokens=True)
        sequences += len(completions)
        # generate() fills rows that stopped early with pad after their EOS; the mask drops those, so this counts
        # the tokens after the prompt up to and including the first EOS (the non-pad tokens there)
        tokens += sum(len(c) for c in completions)
    return sequences, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model, prompts = build(args.preset, args.prompts, args.seed)
    generation_config, eos_ids = trl_generation_config(tokenizer, model, max_new_tokens=args.max_new_tokens,
                                                       temperature=args.temperature)
    paths = {
        "roads": lambda: roads_path(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed, batch_size=args.batch_size),
        "trl": lambda: trl_path(model, tokenizer, prompts, generation_config=generation_config, eos_ids=eos_ids,
                                seed=args.seed, batch_size=args.batch_size),
    }
    for run in paths.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in paths}
    counts: dict[str, list[tuple[int, int]]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            counts[name].append(run())
            times[name].append(time.perf_counter() - start)

    stats = {}
    for name in paths:
        tok_rates = [tok / t for (_, tok), t in zip(counts[name], times[name])]
        seq_rates = [seq / t for (seq, _), t in zip(counts[name], times[name])]
        stats[name] = dict(time=statistics.median(times[name]), tok=statistics.median(tok_rates),
                           seq=statistics.median(seq_rates), lo=min(tok_rates), hi=max(tok_rates),
                           tokens=statistics.median(tok for _, tok in counts[name]),
                           seqs=counts[name][0][0])
    from roads.models import count_parameters

    command = [Path(sys.executable).name, "bench/generation.py", "--preset", args.preset, "--prompts",
               str(args.prompts), "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
               "--temperature", str(args.temperature), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    print(f"preset {args.preset!r} ({count_parameters(model):,} parameters), {len(prompts)} prompts, batch "
          f"{args.batch_size}, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, device {next(model.parameters()).device}; "
          f"median of {args.repeats} interleaved runs after one warm-up each")
    print(f"  {'path':<38}{'time':>9}{'tokens':>9}{'tokens/s':>11}{'(min-max)':>16}{'seqs/s':>9}")
    labels = {"roads": "roads.generation.sample", "trl": "TRL 1.16 (model.generate, GRPO kwargs)"}
    for name in paths:
        s = stats[name]
        spread = f"({s['lo']:.0f}-{s['hi']:.0f})"
        print(f"  {labels[name]:<38}{s['time']:8.2f}s{s['tokens']:9.0f}{s['tok']:11.0f}{spread:>16}{s['seq']:9.1f}")
    print(f"  ratio roads/TRL: tokens/s {stats['roads']['tok'] / stats['trl']['tok']:.2f}, "
          f"seqs/s {stats['roads']['seq'] / stats['trl']['seq']:.2f}")
    print("reproduce: HF_HUB_OFFLINE=1 " + shlex.join(command))


if __name__ == "__main__":
    main()

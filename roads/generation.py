"""Batched sampling with a KV cache and an explicit random generator (so samples depend only on the seed), the same
through vLLM on a GPU when it is installed (both never sample the ids in the policy's
``generation_config.suppress_tokens``: its response vocabulary, see :func:`roads.models.restrict_vocab`), and sequence
log-probabilities and reward-model scores for (prompt, completion) batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roads.errors import RoadsError
from roads.models import suppressed_tokens


@dataclass(frozen=True)
class Completion:
    text: str  # decoded without special tokens
    ids: tuple[int, ...]  # sampled token ids, EOS included when the model stopped
    finished: bool  # stopped on EOS (not cut at max_new_tokens)


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def _sample_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                  generator: torch.Generator, pad_id: int, eos_id: int) -> list[list[int]]:
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    past, step_ids, step_pos = None, input_ids, positions
    suppressed = suppressed_tokens(model)  # the policy's response vocabulary: these ids are never sampled
    suppress_ids = torch.tensor(suppressed, dtype=torch.long, device=device) if suppressed else None
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=attention, position_ids=step_pos,
                       past_key_values=past, use_cache=True)
        past = logits.past_key_values
        last = logits.logits[:, -1, :].float()  # (batch, vocab)
        if suppress_ids is not None:
            last = last.index_fill(-1, suppress_ids, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        else:
            nxt = last.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        done |= nxt == eos_id
        if bool(done.all()):
            out = out[:, : t + 1]
            break
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=1)
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
    rows = []
    for row in out.tolist():  # up to and with the first EOS; after it only padding (pad may equal EOS: it stays)
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


def sample(model, tokenizer, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, seed: int,
           batch_size: int = 64) -> list[list[Completion]]:
    """``n`` completions for each prompt. The same model, prompts and seed give the same completions."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    encoded = encode(tokenizer, prompts)
    flat = [p for p in encoded for _ in range(n)]
    ids: list[list[int]] = []
    for start in range(0, len(flat), batch_size):
        ids += _sample_batch(model, flat[start:start + batch_size], max_new_tokens, temperature, generator,
                             tokenizer.pad_token_id, tokenizer.eos_token_id)
    out: list[list[Completion]] = []
    for i in range(len(prompts)):
        group = []
        for seq in ids[i * n:(i + 1) * n]:
            finished = bool(seq) and seq[-1] == tokenizer.eos_token_id
            group.append(Completion(tokenizer.decode(seq, skip_special_tokens=True), tuple(seq), finished))
        out.append(group)
    return out


def vllm_problem() -> str | None:
    """None when vLLM can generate here; otherwise why not, and how to fix it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: pip install vllm on a CUDA machine (docker/Dockerfile.cuda: WITH_VLLM=1)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and torch sees none (check CUDA_VISIBLE_DEVICES)"
    return None


def sample_vllm(model_dir: str, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, seed: int,
                gpu_memory_utilization: float = 0.5) -> list[list[Completion]]:
    """``sample`` through vLLM's engine: ``n`` completions per prompt of the policy saved in ``model_dir``, the same
    tokens in, the same Completion records out. Seeded per request, but vLLM is not bitwise reproducible across
    versions and GPUs (its version is recorded on the run)."""
    problem = vllm_problem()
    if problem:
        raise RoadsError(f"engine vllm: {problem}; or use the default engine")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    allowed = allowed_token_ids(model_dir, len(tokenizer))
    llm = LLM(model=str(model_dir), seed=seed, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=True)
    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, seed=seed,
                            **({"allowed_token_ids": allowed} if allowed is not None else {}))
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encode(tokenizer, prompts)], params, use_tqdm=False)
    eos = tokenizer.eos_token_id
    groups = [[Completion(text=tokenizer.decode([t for t in c.token_ids if t != eos], skip_special_tokens=True),
                          ids=tuple(c.token_ids), finished=c.finish_reason == "stop") for c in out.outputs]
              for out in outputs]
    del llm
    torch.cuda.empty_cache()
    return groups


def allowed_token_ids(model_dir, vocab: int) -> list[int] | None:
    """The ids below ``vocab`` that the policy saved in ``model_dir`` may sample (vLLM's ``allowed_token_ids``): all
    but its ``generation_config.suppress_tokens``; None when it suppresses nothing."""
    from transformers import GenerationConfig

    try:
        suppressed = GenerationConfig.from_pretrained(str(model_dir)).suppress_tokens
    except OSError:  # no generation_config.json: an unrestricted policy
        return None
    if not suppressed:
        return None
    out = set(suppressed)
    return [i for i in range(vocab) if i not in out]


LOGIT_TOKENS = 8192  # rows x width of one scoring batch at most: 64 rows up to 128 tokens (every preset), 16 at 512


def logit_batches(lengths: list[int], batch_size: int, budget: int = LOGIT_TOKENS) -> list[tuple[int, int]]:
    """(start, end) of consecutive batches of at most ``batch_size`` rows whose rows x longest row stays within
    ``budget`` tokens (a single longer row is a batch of its own). Their logits are rows x width x vocabulary
    floats: 64 rows of 512 tokens under SmolLM2's 49,152-token vocabulary are 6.4 GB a copy, and offline DPO's
    displacement probe ran the machine out of memory with them (hh-rlhf, measured)."""
    out, start = [], 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while (end < len(lengths) and end - start < batch_size
               and (end - start + 1) * max(width, lengths[end]) <= budget):
            width = max(width, lengths[end])
            end += 1
        out.append((start, end))
        start = end
    return out


@torch.no_grad()
def sequence_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                   batch_size: int = 64) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each completion's tokens; shape (N,), in the order given. Scored shortest first,
    in batches of at most ``batch_size`` rows and ``LOGIT_TOKENS`` tokens (``logit_batches``): rows of like lengths
    share a batch, so little of it is padding — in the order given, 32 HH-RLHF pairs' sequences were 2.6× their
    tokens once padded, and scoring them took 23.4 s against 13.0 s sorted (SmolLM2-135M, 2 threads, measured)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # stable: ties keep the given order
    for start, end in logit_batches([lengths[i] for i in order], batch_size):
        ps = [prompt_ids[i] for i in order[start:end]]
        cs = [completion_ids[i] for i in order[start:end]]
        seqs = [list(p) + list(c) for p, c in zip(ps, cs)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)  # marks completion positions
        for i, (p, s) in enumerate(zip(ps, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            target[i, len(p): len(s)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:].to(device)[..., None]).squeeze(-1)  # (B, T-1)
        out.append((tok_logp * target[:, 1:].to(device)).sum(-1).cpu())
    if not out:
        return torch.zeros(0)
    scored = torch.cat(out)
    return scored[torch.argsort(torch.tensor(order))]  # back in the order given


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: list[str], completions: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """Scalar reward r(x, y) of each pair, tokenised as TRL's RewardTrainer does (prompt + completion + EOS)."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(prompts), batch_size):
        texts = [p + c + tokenizer.eos_token for p, c in zip(prompts[start:start + batch_size],
                                                            completions[start:start + batch_size])]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)

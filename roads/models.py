"""Tokenizer and model factory: a byte-level BPE tokenizer trained locally and tiny Llama-style presets built from
config (no download), or a pretrained causal LM and tokenizer by local path or hub name."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from roads.errors import RoadsError

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}

# hidden, intermediate, layers, heads  (parameter counts with a 384-token vocabulary, tied embeddings)
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),  # ≈0.1M
    "small": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4),  # ≈0.8M
    "base": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8),  # ≈4.8M
}


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 384, max_length: int = 256) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus``: never an unknown token, exact round trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, padding_side="right", **SPECIAL)


def new_causal_lm(preset: str, tokenizer, seed: int, max_positions: int = 256) -> LlamaForCausalLM:
    """A freshly initialised Llama of the given preset; the same seed gives the same weights."""
    if preset not in PRESETS:
        raise RoadsError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=PRESETS[preset]["num_attention_heads"],
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **PRESETS[preset],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_pretrained(name_or_path: str):
    """A causal LM and its tokenizer from a local folder, a ``.gguf`` file (dequantised to float32, see
    :func:`roads.fetch.gguf_model`), a fetched model's short name (``smollm2-135m``: :func:`roads.fetch.resolve_pretrained`)
    or a hub name (a missing pad token falls back to EOS)."""
    from roads.fetch import resolve_pretrained

    name_or_path = resolve_pretrained(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    is_gguf = name_or_path.endswith(".gguf") and Path(name_or_path).expanduser().is_file()
    if looks_local and not is_gguf and not Path(name_or_path).expanduser().is_dir():
        raise RoadsError(f"model.pretrained: no folder at {name_or_path!r}; give a folder with config.json and weights"
                         " or a .gguf file")
    try:
        if is_gguf:
            from roads.fetch import gguf_model

            model, tokenizer = gguf_model(name_or_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RoadsError(
            f"model.pretrained: cannot load {name_or_path!r} ({first}); give a local folder with config.json and "
            "weights, or a hub name on a machine that can reach the hub"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer of ``model.pretrained`` alone (a folder, a fetched model's short name, a hub name, or a .gguf
    file's metadata)."""
    from roads.fetch import resolve_pretrained

    name_or_path = resolve_pretrained(name_or_path)
    path = Path(name_or_path).expanduser()
    try:
        if name_or_path.endswith(".gguf") and path.is_file():
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RoadsError(f"model.pretrained: cannot load the tokenizer of {name_or_path!r} ({first})") from None


def load_policy(path: str | Path):
    """A policy and its tokenizer: a saved causal LM, or a composed policy (``policy.json``, see :class:`ComposedLM`)."""
    spec = Path(path) / POLICY_FILE
    if spec.is_file():
        import json

        parts = json.loads(spec.read_text())["parts"]
        loaded = [load_policy(Path(path) / part["path"]) for part in parts]
        model = ComposedLM([m for m, _ in loaded], [p["transform"] for p in parts], [p["weight"] for p in parts])
        return model, loaded[0][1]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    return model, tokenizer


def reward_model_from_policy(path: str | Path, seed: int):
    """A scalar-head reward model initialised from a saved policy (the paper's global RM: SFT + linear head). The new
    head is drawn from ``seed``, not from whatever state the process's global generator is in."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    distinct_pad(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def distinct_pad(tokenizer) -> None:
    """A reward model reads its score at the rightmost token that is not the pad token (transformers' rule, in TRL's
    RewardTrainer and in :func:`roads.generation.reward_scores`): with pad == EOS (SmolLM2, or the EOS fallback) that
    is the token before the EOS, so the EOS is never scored. Make pad another special token of the vocabulary
    (padding is masked, so which one does not matter; the scored sequence ends in EOS, so it is read there); a
    tokenizer with no other special token keeps pad == EOS."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        others = [t for t in tokenizer.all_special_tokens if t != tokenizer.eos_token]
        if others:
            tokenizer.pad_token = others[0]


def load_reward_model(path: str | Path):
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the response vocabulary
def response_token_ids(tokenizer, symbols: str) -> list[int]:
    """Ids of the tokens a policy restricted to a task's response vocabulary may sample: those whose decoded text is
    non-empty and made only of ``symbols`` (the characters of the task's response symbols) and spaces, plus EOS. Other
    special tokens, byte fragments and prompt text are out."""
    allowed_chars = set(symbols) | {" "}
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    ids = [i for i, text in enumerate(texts) if i not in special and text and set(text) <= allowed_chars]
    return sorted(set(ids) | {tokenizer.eos_token_id})


def restrict_vocab(model, tokenizer, symbols: str) -> list[int]:
    """Restrict ``model`` to the response vocabulary of ``symbols`` as a property of the policy: every other id of its
    output layer goes into ``model.generation_config.suppress_tokens``, which ``save_pretrained`` saves and every
    policy loaded from it keeps; roads' sampler, vLLM (``sample_vllm``), HF ``generate`` and online_rl honour it.
    Returns the suppressed ids."""
    suppressed = outside_response_vocab(model, tokenizer, symbols)
    model.generation_config.suppress_tokens = suppressed
    return suppressed


def outside_response_vocab(model, tokenizer, symbols: str) -> list[int]:
    """Every id of ``model``'s output layer that :func:`response_token_ids` leaves out (what ``restrict_vocab``
    suppresses)."""
    allowed = set(response_token_ids(tokenizer, symbols))
    return [i for i in range(vocab_rows(model)) if i not in allowed]


def vocab_rows(model) -> int:
    """Rows of the model's output layer (can exceed the tokenizer's length for padded pretrained vocabularies)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def suppressed_tokens(model) -> list[int]:
    """The token ids a policy never samples (its ``generation_config.suppress_tokens``); empty when unrestricted."""
    return list(getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or [])


@torch.no_grad()
def suppressed_mass(model, tokenizer, rows: list[dict], token_ids: list[int], batch_size: int = 64) -> float:
    """Mean over the response positions of ``rows`` (prompt/completion; each completion token and the closing EOS,
    as SFT trains them) of the probability the model puts on ``token_ids``."""
    if not rows or not token_ids:
        return 0.0
    model.eval()
    device = next(model.parameters()).device
    ids_of = torch.tensor(sorted(set(token_ids)), device=device)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk]
        seqs = [p + tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for p, r in zip(prompts, chunk)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        predicts = torch.zeros_like(ids, dtype=torch.bool)  # positions whose next token is a response token
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            predicts[i, len(p) - 1: len(s) - 1] = True
        probs = torch.softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
        mass = probs.index_select(-1, ids_of).sum(-1)  # (B, T)
        total += float(mass[predicts.to(device)].sum())
        count += int(predicts.sum())
    return total / count if count else 0.0


# --------------------------------------------------------------------------- composed policies
POLICY_FILE = "policy.json"
TRANSFORMS = ("logits", "log_softmax", "softmax")


class ComposedLM(torch.nn.Module):
    """A policy whose next-token logits are a weighted sum of transformed logits of causal LMs that share a vocabulary:
    ``logits = Σ_i w_i · T_i(f_i(x))`` with T ∈ {logits, log_softmax, softmax}. Q-SFT's extraction is
    log π_behaviour + β·p_likelihood; inverse value learning's is base logits + value logits. It samples, scores and
    evaluates like any causal LM here: the key-value cache is a tuple with one cache per part."""

    def __init__(self, models: list[torch.nn.Module], transforms: list[str], weights: list[float]):
        super().__init__()
        if not models or not len(models) == len(transforms) == len(weights):
            raise RoadsError("a composed policy needs one transform and one weight per model")
        for t in transforms:
            if t not in TRANSFORMS:
                raise RoadsError(f"unknown logit transform {t!r}; choose one of {', '.join(TRANSFORMS)}")
        self.parts = torch.nn.ModuleList(models)
        self.transforms, self.weights = list(transforms), [float(w) for w in weights]
        self.config = models[0].config
        # a token any part suppresses stays suppressed: the composed policy keeps its parts' response vocabulary
        self.generation_config = copy.deepcopy(models[0].generation_config)
        suppressed = sorted({t for m in models for t in suppressed_tokens(m)})
        self.generation_config.suppress_tokens = suppressed or None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **kwargs):
        pasts = past_key_values if past_key_values is not None else (None,) * len(self.parts)
        total, caches = None, []
        for model, transform, weight, past in zip(self.parts, self.transforms, self.weights, pasts):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past, use_cache=use_cache)
            logits = out.logits.float()
            if transform == "log_softmax":
                logits = torch.log_softmax(logits, dim=-1)
            elif transform == "softmax":
                logits = torch.softmax(logits, dim=-1)
            total = weight * logits if total is None else total + weight * logits
            caches.append(out.past_key_values if use_cache else None)
        return SimpleNamespace(logits=total, past_key_values=tuple(caches) if use_cache else None)


def write_composed(out_dir: str | Path, parts: list[dict]) -> None:
    """``policy.json`` of a composed policy: parts = [{"path": subfolder, "transform": …, "weight": …}, …]; the
    subfolders live inside ``out_dir`` so the policy's digest covers every weight it uses."""
    import json

    for part in parts:
        if part["transform"] not in TRANSFORMS:
            raise RoadsError(f"unknown logit transform {part['transform']!r}")
    (Path(out_dir) / POLICY_FILE).write_text(json.dumps({"parts": parts}, indent=1))

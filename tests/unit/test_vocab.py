"""The policy's response vocabulary: a policy restricted to a synthetic task samples only tokens made of the task's
response symbols and spaces (and EOS). The restriction is a property of the policy — ``generation_config.
suppress_tokens``, saved with it — so roads' sampler (temperature and greedy), HF ``generate``, vLLM and online_rl's
TRL trainers all honour it without being told. A freshly initialised policy puts most of its mass off the alphabet,
so each "never" below is checked against the same draw without the restriction, which does leave the alphabet."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from roads.config import StageSpec
from roads.data.synthetic import SyntheticTask, generate
from roads.generation import _sample_batch, allowed_token_ids, encode, sample, sample_vllm
from roads.models import (ComposedLM, build_tokenizer, load_policy, new_causal_lm, outside_response_vocab,
                          response_token_ids, restrict_vocab, suppressed_mass, suppressed_tokens)
from roads.runner import execute
from roads.settings import ModelConfig, OnlineRlConfig, PrepareDataConfig, SftConfig, TaskConfig
from roads.stages import online_rl

TASK = SyntheticTask("gap")
SYMBOLS = TASK.response_symbols
PROMPTS = ["sort: c a b ->", "sort: h g f e d c b a ->", "sort: a d ->", "sort: b b a c e ->", "sort: f e ->"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    data = generate(TASK, seed=0, n_sft=200, n_pairs=1, n_val_pairs=1, n_eval_prompts=1, demo_noise=0.3,
                    behaviour_noise=0.5, bt_temperature=0.1)
    return build_tokenizer([r["prompt"] + r["completion"] for r in data["sft"]])


def fresh(tokenizer, restricted: bool):
    """An untrained tiny policy (it puts mass everywhere), restricted to the task or not."""
    model = new_causal_lm("tiny", tokenizer, seed=0).eval()
    if restricted:
        restrict_vocab(model, tokenizer, SYMBOLS)
    return model


def on_alphabet(tokenizer, ids) -> bool:
    return set(ids) <= set(response_token_ids(tokenizer, SYMBOLS))


def sampled_ids(model, tokenizer, n=24, seed=0, temperature=1.0):
    groups = sample(model, tokenizer, PROMPTS, n=n, max_new_tokens=8, temperature=temperature, seed=seed)
    return [c.ids for g in groups for c in g], [c.text for g in groups for c in g]


# --------------------------------------------------------------------------- which tokens


def test_response_tokens_are_the_symbols_spaces_and_eos(tokenizer):
    allowed = response_token_ids(tokenizer, SYMBOLS)
    texts = {i: tokenizer.decode([i]) for i in allowed if i != tokenizer.eos_token_id}
    assert tokenizer.eos_token_id in allowed
    assert all(t and set(t) <= set(SYMBOLS + " ") for t in texts.values())
    assert {s for s in SYMBOLS} | {" " + s for s in SYMBOLS} <= set(texts.values())  # every symbol, both ways
    for special in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id):
        assert special not in allowed
    for off in ("sort", " ->", "i", ":"):  # prompt text and symbols outside the alphabet (gap's has 8: a..h)
        assert not any(t == off for t in texts.values())
    outside = outside_response_vocab(fresh(tokenizer, False), tokenizer, SYMBOLS)
    assert sorted(outside + allowed) == list(range(len(tokenizer)))
    assert len(outside) > 200  # byte tokens, prompt words, merges: most of the vocabulary


# --------------------------------------------------------------------------- roads' sampler


def test_restricted_policy_never_samples_off_the_alphabet(tokenizer):
    free_ids, _ = sampled_ids(fresh(tokenizer, False), tokenizer)
    assert sum(not on_alphabet(tokenizer, ids) for ids in free_ids) > len(free_ids) // 2  # the test can fail
    ids, texts = sampled_ids(fresh(tokenizer, True), tokenizer)
    assert len(ids) == len(PROMPTS) * 24 and sum(map(len, ids)) > 500
    assert all(on_alphabet(tokenizer, row) for row in ids)
    assert all(set(t) <= set(SYMBOLS + " ") for t in texts)
    assert any(row and row[-1] == tokenizer.eos_token_id for row in ids)  # EOS stays allowed


def test_restriction_keeps_samples_deterministic(tokenizer):
    model = fresh(tokenizer, True)
    assert sampled_ids(model, tokenizer, n=4, seed=3) == sampled_ids(model, tokenizer, n=4, seed=3)


def test_greedy_honours_the_restriction_and_matches_hf_generate(tokenizer):
    model = fresh(tokenizer, False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a varied model (a fresh one repeats one token): its greedy choices leave the alphabet
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5, generator=g)
    enc = encode(tokenizer, PROMPTS)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = lambda: _sample_batch(model, enc, 8, 0.0, torch.Generator().manual_seed(0), pad, eos)  # noqa: E731
    assert not all(on_alphabet(tokenizer, row) for row in greedy())
    restrict_vocab(model, tokenizer, SYMBOLS)
    ours = greedy()
    assert all(on_alphabet(tokenizer, row) for row in ours) and any(ours)
    for ids, row in zip(enc, ours):  # HF generate reads the same generation_config.suppress_tokens
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
        theirs = out[0, len(ids):].tolist()
        assert row == (theirs[: theirs.index(eos) + 1] if eos in theirs else theirs)


def test_restriction_survives_save_and_load(tokenizer, tmp_path):
    model = fresh(tokenizer, True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["suppress_tokens"] == suppressed_tokens(model)
    loaded, tok = load_policy(tmp_path)
    assert suppressed_tokens(loaded) == suppressed_tokens(model) != []
    ids, _ = sampled_ids(loaded, tok, n=8)
    assert all(on_alphabet(tok, row) for row in ids)
    # and a policy saved from the loaded one (what DPO, online DPO and RL do) keeps it
    loaded.save_pretrained(tmp_path / "again")
    assert suppressed_tokens(load_policy_from(tmp_path / "again", tokenizer)) == suppressed_tokens(model)
    allowed = allowed_token_ids(tmp_path, len(tokenizer))
    assert allowed == response_token_ids(tokenizer, SYMBOLS)


def load_policy_from(path: Path, tokenizer):
    tokenizer.save_pretrained(path)
    return load_policy(path)[0]


def test_unrestricted_policy_has_no_suppressed_tokens(tokenizer, tmp_path):
    model = fresh(tokenizer, False)
    assert suppressed_tokens(model) == []
    model.save_pretrained(tmp_path)
    assert allowed_token_ids(tmp_path, len(tokenizer)) is None


def test_composed_policy_keeps_its_parts_restriction(tokenizer):
    composed = ComposedLM([fresh(tokenizer, False), fresh(tokenizer, True)], ["log_softmax", "logits"], [1.0, 0.5])
    assert suppressed_tokens(composed) == suppressed_tokens(fresh(tokenizer, True))
    ids, _ = sampled_ids(composed, tokenizer, n=6)
    assert all(on_alphabet(tokenizer, row) for row in ids)


def test_suppressed_mass_by_hand(tokenizer):
    model = fresh(tokenizer, True)
    rows = [{"prompt": "sort: b a ->", "completion": " a b"}, {"prompt": "sort: c ->", "completion": " c"}]
    outside = suppressed_tokens(model)
    expected = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        s = p + tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([s])).logits[0].double(), dim=-1)
        expected += [float(probs[t, outside].sum()) for t in range(len(p) - 1, len(s) - 1)]
    got = suppressed_mass(model, tokenizer, rows, outside)
    assert got == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert 0.5 < got < 1.0  # untrained: most of its mass sits off the alphabet
    assert suppressed_mass(model, tokenizer, rows, []) == 0.0


# --------------------------------------------------------------------------- vLLM


def test_vllm_gets_the_allowed_token_ids(tokenizer, tmp_path, monkeypatch):
    fresh(tokenizer, True).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    made = {}

    class Engine:
        def __init__(self, **kw):
            pass

        def generate(self, requests, params, use_tqdm):
            made["params"] = params
            return [types.SimpleNamespace(outputs=[]) for _ in requests]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = Engine, lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr("roads.generation.vllm_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    sample_vllm(str(tmp_path), PROMPTS[:1], n=1, max_new_tokens=2, temperature=1.0, seed=0)
    assert made["params"].allowed_token_ids == response_token_ids(tokenizer, SYMBOLS)


# --------------------------------------------------------------------------- the stages: sft and online_rl


def data_for(store, response_vocab: str):
    cfg = PrepareDataConfig(n_sft=32, n_sft_val=8, n_pairs=16, n_val_pairs=4, n_eval_prompts=2)
    spec = StageSpec(stage="prepare_data", params=cfg.model_dump(), seed=0,
                     task=TaskConfig(family="gap", response_vocab=response_vocab))
    return execute(spec, {}, store).artifact


@pytest.fixture(scope="module", params=["task", "all"])
def sft(request, tmp_path_factory):
    """(response_vocab, data, sft result): a one-epoch tiny SFT policy (barely trained: mass everywhere)."""
    store = tmp_path_factory.mktemp(f"store_{request.param}")
    data = data_for(store, request.param)
    spec = StageSpec(stage="sft", params=SftConfig(epochs=1, batch_size=16).model_dump(), seed=0, model=ModelConfig())
    return request.param, data, execute(spec, {"data": data}, store)


def test_sft_saves_the_restriction_and_its_mass(sft):
    vocab, _, result = sft
    policy, tokenizer = load_policy(result.artifact.path)
    outside = outside_response_vocab(policy, tokenizer, SYMBOLS)
    assert suppressed_tokens(policy) == (outside if vocab == "task" else [])
    assert 0.3 < result.metrics["sft/suppressed_mass"] < 1.0  # measured either way: what sampling drops or keeps
    ids, _ = sampled_ids(policy, tokenizer, n=8)
    assert all(on_alphabet(tokenizer, row) for row in ids) == (vocab == "task")


def test_online_rl_samples_keep_the_restriction(sft, monkeypatch, tmp_path):
    """GRPO on the gold reward from the SFT policy: every completion TRL generates is on the alphabet when the policy
    is restricted (and not when it is not); the RL policy it saves keeps the restriction."""
    vocab, data, result = sft
    seen: list[list[int]] = []
    counting = online_rl.counting

    def recording(func, counts):
        inner = counting(func, counts)

        def reward(prompts, completions, completion_ids=None, **kwargs):
            seen.extend(list(ids) for ids in completion_ids)
            return inner(prompts, completions, completion_ids=completion_ids, **kwargs)

        reward.__name__ = inner.__name__
        return reward

    monkeypatch.setattr(online_rl, "counting", recording)
    params = OnlineRlConfig(algorithm="grpo", verifier="gold", epochs=1, batch_size=8, num_generations=4,
                            max_new_tokens=8, n_prompts=4, logging_steps=1, lr=1e-4).model_dump()
    spec = StageSpec(stage="online_rl", params=params, seed=0, variant="online_rl", task_name="gap")
    rl = execute(spec, {"data": data, "reference": result.artifact}, tmp_path)
    _, tokenizer = load_policy(result.artifact.path)
    assert len(seen) == 16 and sum(map(len, seen)) > 40
    assert all(on_alphabet(tokenizer, ids) for ids in seen) == (vocab == "task")
    policy, _ = load_policy(rl.artifact.path)
    assert suppressed_tokens(policy) == suppressed_tokens(load_policy(result.artifact.path)[0])


def test_rl_config_passes_the_restriction_to_trl(tmp_path):
    cfg = OnlineRlConfig(algorithm="rloo", batch_size=8, num_generations=4)
    assert online_rl.rl_config(cfg, 0, str(tmp_path)).generation_kwargs is None
    args = online_rl.rl_config(cfg, 0, str(tmp_path), [5, 3, 3], 8)
    assert args.generation_kwargs == {"suppress_tokens": [3, 5]}
    assert online_rl.restriction_kwargs([5, 3], 8, use_vllm=True) == {"allowed_token_ids": [0, 1, 2, 4, 6, 7]}
    assert online_rl.restriction_kwargs([], 8, use_vllm=True) is None

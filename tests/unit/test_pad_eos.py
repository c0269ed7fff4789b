"""A tokenizer whose pad token is its EOS (SmolLM2's, and roads' fallback for tokenizers without a pad), built
locally: completions keep their EOS and are ``finished`` when they end — in the sampler, the pairs online DPO trains
on, the KL and lengths of evaluate, and the reward model's score (read at the EOS, as with a distinct pad)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roads.data.synthetic import SyntheticTask, generate
from roads.generation import encode, reward_scores, sample, sequence_logps
from roads.models import build_tokenizer, new_causal_lm, reward_model_from_policy
from roads.stages.online_dpo import best_worst_pairs

PROMPTS = ["sort: c a b ->", "sort: h g f e d c b a ->", "sort: a d ->", "sort: b b a c e ->", "sort: f e ->",
           "sort: a a a a a a ->"]


@pytest.fixture(scope="module")
def tokenizers():
    """(distinct pad, pad == EOS): the same vocabulary, only the pad differs."""
    data = generate(SyntheticTask("gap"), seed=0, n_sft=200, n_pairs=1, n_val_pairs=1, n_eval_prompts=1,
                    demo_noise=0.3, behaviour_noise=0.5, bt_temperature=0.1)
    corpus = [r["prompt"] + r["completion"] for r in data["sft"]]
    distinct, same = build_tokenizer(corpus), build_tokenizer(corpus)
    same.pad_token = same.eos_token
    assert same.pad_token_id == same.eos_token_id != distinct.pad_token_id
    return distinct, same


@pytest.fixture(scope="module")
def policy_dir(tokenizers, tmp_path_factory):
    """A saved tiny Llama with the pad == EOS tokenizer whose samples stop at different lengths (weights redrawn with
    std 0.5, the tied EOS row scaled up: EOS wins at some steps, not at others)."""
    tok = tokenizers[1]
    m = new_causal_lm("tiny", tok, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5, generator=g)
        m.get_input_embeddings().weight[tok.eos_token_id] *= 2.0
    m.generation_config.suppress_tokens = [i for i in tok.added_tokens_decoder if i != tok.eos_token_id]
    out = tmp_path_factory.mktemp("policy")
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def policy(policy_dir):
    from roads.models import load_policy

    model, tok = load_policy(policy_dir)
    assert tok.pad_token_id == tok.eos_token_id
    return model.eval(), tok


@pytest.fixture(scope="module")
def samples(policy):
    model, tok = policy
    return sample(model, tok, PROMPTS, n=4, max_new_tokens=8, temperature=1.0, seed=0)


def test_sampler_keeps_eos_and_finishes(samples, policy, tokenizers):
    model, tok = policy
    eos = tok.eos_token_id
    flat = [c for group in samples for c in group]
    assert any(c.finished for c in flat) and any(not c.finished for c in flat)  # both kinds: not vacuous
    for c in flat:
        assert c.finished == (len(c.ids) > 0 and c.ids[-1] == eos)
        assert eos not in c.ids[:-1]
        assert c.finished or len(c.ids) == 8  # an unfinished completion ran to the limit
    # the pad only fills masked prompt positions: the same samples as with a distinct pad token
    assert sample(model, tokenizers[0], PROMPTS, n=4, max_new_tokens=8, temperature=1.0, seed=0) == samples


def test_online_pairs_train_on_the_sampled_ids_eos_included(samples, policy):
    """online_dpo pairs are texts; TRL's DPOTrainer appends the EOS to each: a finished chosen completion trains on
    what was sampled, its one EOS at the end."""
    _, tok = policy
    texts = [[c.text for c in group] for group in samples]
    scores = [[float(c.finished) + 0.01 * len(c.ids) for c in group] for group in samples]  # finished ones win
    pairs = best_worst_pairs(PROMPTS, texts, scores)
    assert pairs
    by_text = {(p, c.text): c for p, group in zip(PROMPTS, samples) for c in group}
    checked = 0
    for pair in pairs:
        chosen = by_text[(pair["prompt"], pair["chosen"])]
        if chosen.finished:
            prompt_ids = encode(tok, [pair["prompt"]])[0]
            trained = encode(tok, [pair["prompt"] + pair["chosen"] + tok.eos_token])[0]
            completion = trained[len(prompt_ids):]  # the same text (a random policy's tokens need not be BPE's)
            assert completion[-1] == chosen.ids[-1] == tok.eos_token_id
            assert tok.decode(completion) == tok.decode(list(chosen.ids))
            checked += 1
    assert checked


def test_kl_and_length_count_the_eos(samples, policy):
    model, tok = policy
    flat_prompts = [p for p, group in zip(PROMPTS, samples) for _ in group]
    flat = [c for group in samples for c in group]
    prompt_ids = encode(tok, flat_prompts)
    logp = sequence_logps(model, prompt_ids, [list(c.ids) for c in flat], pad_id=tok.pad_token_id)
    for i, c in enumerate(flat):
        ids = torch.tensor([prompt_ids[i] + list(c.ids)])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        expected = sum(float(lp[len(prompt_ids[i]) + j - 1, t]) for j, t in enumerate(c.ids))
        assert float(logp[i]) == pytest.approx(expected, abs=1e-4)  # the EOS term is in the sum


def test_evaluate_records_finished_and_lengths(policy_dir, samples, tmp_path):
    """evaluate on the pad == EOS policy: finished_rate > 0 and length excludes the EOS."""
    from roads.artifacts import ArtifactRef, read_jsonl
    from roads.config import StageSpec
    from roads.settings import EvaluateConfig
    from roads.stages import evaluate

    from support import tiny_data

    data = Path(tiny_data(tmp_path / "store", n_pairs=4).path)
    cfg = EvaluateConfig(samples_per_prompt=8, max_new_tokens=8)
    spec = StageSpec(stage="evaluate", params=cfg.model_dump(), seed=0, policy="sft")
    ref = ArtifactRef(str(policy_dir), "x")
    out = tmp_path / "out"
    out.mkdir()
    result = evaluate.run(spec, {"data": ArtifactRef(str(data), "d"), "policy": ref, "reference": ref}, out)
    rows = read_jsonl(out / "samples.jsonl")
    assert 0 < result.metrics["evaluate/finished_rate"] < 1
    assert result.metrics["evaluate/finished_rate"] == pytest.approx(sum(r["finished"] for r in rows) / len(rows))
    assert all(r["length"] == 8 for r in rows if not r["finished"]) \
        and all(r["length"] < 8 for r in rows if r["finished"])  # the EOS is not counted


def test_reward_model_scores_at_the_eos(policy_dir, policy):
    """reward_model_from_policy gives the reward model a pad other than EOS (TRL's RewardTrainer pads with it and
    reads at the last non-pad token): the score is the head at the EOS, padded or not."""
    _, policy_tok = policy
    rm, tok = reward_model_from_policy(policy_dir, seed=0)
    assert tok.pad_token_id != tok.eos_token_id and rm.config.pad_token_id == tok.pad_token_id
    assert tok.eos_token_id == policy_tok.eos_token_id and len(tok) == len(policy_tok)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    rm.eval()
    p, c = PROMPTS[1], " a b"
    ids = tok(p + c + tok.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        at_eos, before_eos = float(rm.score(hidden[-1])[0]), float(rm.score(hidden[-2])[0])
    assert at_eos != pytest.approx(before_eos, abs=1e-4)
    got = reward_scores(rm, tok, [PROMPTS[0], p], [" a b c d e f g h a b c", c])[1].item()
    assert got == pytest.approx(at_eos, abs=1e-5)

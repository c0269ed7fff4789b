"""Tests for roads.generation (sampling with a KV cache and left padding, sequence log-probabilities, reward scores)
and the hand-computable metrics of evaluate (win_rate) and the verifiers (preference_metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from roads.data.synthetic import SyntheticTask, generate
from roads.generation import Completion, _sample_batch, encode, reward_scores, sample, sequence_logps
from roads.models import build_tokenizer, new_causal_lm

PROMPTS = ["sort: c a b ->", "sort: h g f e d c b a ->", "sort: a d ->", "sort: b b a c e ->", "sort: f e ->",
           "sort: a a a a a a ->"]


@pytest.fixture(scope="module")
def tokenizer():
    data = generate(SyntheticTask("gap"), seed=0, n_sft=200, n_pairs=1, n_val_pairs=1, n_eval_prompts=1,
                    demo_noise=0.3, behaviour_noise=0.5, bt_temperature=0.1)
    return build_tokenizer([r["prompt"] + r["completion"] for r in data["sft"]])


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny Llama whose greedy continuations vary and stop at different lengths. A freshly initialised model
    (std 0.02) repeats one token forever, which would make the comparisons below vacuous, so the weights are redrawn
    with std 0.5 and the (tied) EOS row is scaled up so that EOS wins at some steps and not at others."""
    m = new_causal_lm("tiny", tokenizer, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5, generator=g)
        m.get_input_embeddings().weight[tokenizer.eos_token_id] *= 2.0
    return m.eval()


def greedy(model, tokenizer, prompts_ids, max_new_tokens=10):
    g = torch.Generator().manual_seed(0)
    return _sample_batch(model, prompts_ids, max_new_tokens, 0.0, g, tokenizer.pad_token_id, tokenizer.eos_token_id)


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# --------------------------------------------------------------------------- sampling


def test_sample_deterministic_for_a_seed(model, tokenizer):
    kw = dict(n=3, max_new_tokens=8, temperature=1.0)
    a = sample(model, tokenizer, PROMPTS, seed=0, **kw)
    b = sample(model, tokenizer, PROMPTS, seed=0, **kw)
    c = sample(model, tokenizer, PROMPTS, seed=1, **kw)
    assert a == b
    assert a != c
    assert len(a) == len(PROMPTS) and all(len(group) == 3 for group in a)
    for group in a:
        for comp in group:
            assert isinstance(comp, Completion)
            assert comp.finished == (len(comp.ids) > 0 and comp.ids[-1] == tokenizer.eos_token_id)
            assert tokenizer.eos_token_id not in comp.ids[:-1]
            assert len(comp.ids) <= 8
            assert comp.text == tokenizer.decode(list(comp.ids), skip_special_tokens=True)
    # samples within a group differ (a hot, diverse model): n copies are real draws, not one draw repeated
    assert any(len({c.ids for c in group}) > 1 for group in a)


def test_sample_does_not_touch_global_rng(model, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(model, tokenizer, PROMPTS[:2], n=2, max_new_tokens=4, temperature=1.0, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_matches_hf_generate(model, tokenizer):
    eos = tokenizer.eos_token_id
    enc = encode(tokenizer, PROMPTS)
    for ids in enc:
        ours = greedy(model, tokenizer, [ids], max_new_tokens=8)[0]
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        theirs = cut_at_eos(out[0, len(ids):].tolist(), eos)
        assert ours == theirs, tokenizer.decode(ids)


def test_batched_left_padded_greedy_equals_one_at_a_time(model, tokenizer):
    eos = tokenizer.eos_token_id
    enc = encode(tokenizer, PROMPTS)
    assert len({len(e) for e in enc}) >= 4  # really different lengths: real left padding
    batched = greedy(model, tokenizer, enc, max_new_tokens=10)
    alone = [greedy(model, tokenizer, [ids], max_new_tokens=10)[0] for ids in enc]
    # the comparison means something: some rows stop early on EOS, some run to the limit, outputs vary
    assert any(row and row[-1] == eos for row in batched)
    assert any(len(row) == 10 and eos not in row for row in batched)
    assert len({tuple(r) for r in batched}) > 1
    assert batched == alone
    # and the order of the batch does not matter either
    assert greedy(model, tokenizer, enc[::-1], max_new_tokens=10) == alone[::-1]


# --------------------------------------------------------------------------- sequence log-probabilities


def manual_logp(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    return float(sum(logp[len(prompt) + j - 1, tok] for j, tok in enumerate(completion)))


def test_sequence_logps_matches_manual_and_ignores_padding(model, tokenizer):
    prompts = encode(tokenizer, PROMPTS)
    completions = encode(tokenizer, [" a b c", " a", " a d e f g h", " c", " e f", " a a a a a a"])
    completions[1] = completions[1] + [tokenizer.eos_token_id]  # an EOS-terminated completion, as sampled
    expected = torch.tensor([manual_logp(model, p, c) for p, c in zip(prompts, completions)], dtype=torch.float32)
    batched = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id, batch_size=64)
    alone = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id, batch_size=1)
    pairs = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id, batch_size=4)
    assert batched.shape == (len(PROMPTS),)
    assert torch.allclose(alone, expected, atol=1e-5, rtol=0)
    assert torch.allclose(batched, expected, atol=1e-5, rtol=0)
    assert torch.allclose(pairs, expected, atol=1e-5, rtol=0)
    assert (batched < 0).all()


def test_sequence_logps_batches_rows_of_like_length(model, tokenizer):
    """Shortest first: long rows given between short ones do not pad the short ones' batch (32 HH-RLHF pairs were 2.6×
    their tokens padded in the order given); the scores come back in the order given."""
    prompts = encode(tokenizer, PROMPTS)
    completions = encode(tokenizer, [" a b c d e f g h a b c d", " a", " a b c d e f g h a b c d", " c",
                                     " a b c d e f g h a b c d", " e"])
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        got = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id, batch_size=3)
    finally:
        hook.remove()
    lengths = sorted(len(p) + len(c) for p, c in zip(prompts, completions))
    assert shapes == [(3, lengths[2]), (3, lengths[5])]
    alone = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id, batch_size=1)
    assert torch.allclose(got, alone, atol=1e-5, rtol=0)


def test_sequence_logps_empty_completion_is_zero(model, tokenizer):
    prompts = encode(tokenizer, PROMPTS[:2])
    out = sequence_logps(model, prompts, [[], encode(tokenizer, [" a"])[0]], pad_id=tokenizer.pad_token_id)
    assert out[0].item() == 0.0 and out[1].item() < 0
    assert sequence_logps(model, [], [], pad_id=tokenizer.pad_token_id).shape == (0,)


def test_sequence_logps_of_sampled_ids_are_finite(model, tokenizer):
    """Scoring what the sampler produced (EOS-terminated or cut rows of different lengths) gives finite values ≤ 0."""
    enc = encode(tokenizer, PROMPTS)
    ids = greedy(model, tokenizer, enc, max_new_tokens=6)
    logp = sequence_logps(model, enc, ids, pad_id=tokenizer.pad_token_id)
    assert torch.isfinite(logp).all() and (logp <= 0).all()


# --------------------------------------------------------------------------- reward scores


@pytest.fixture(scope="module")
def reward_model(tokenizer, model):
    from transformers import AutoModelForSequenceClassification

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_labels = 1
    cfg.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_config(cfg)
        with torch.no_grad():
            rm.score.weight.normal_(0.0, 1.0)
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    return rm.eval()


def test_reward_scores_padding_invariant(reward_model, tokenizer):
    completions = [" a b c", " a", " a b c d e f g h", "", " e f", " a a a"]
    batched = reward_scores(reward_model, tokenizer, PROMPTS, completions, batch_size=64)
    alone = torch.cat([reward_scores(reward_model, tokenizer, [p], [c], batch_size=1)
                       for p, c in zip(PROMPTS, completions)])
    assert batched.shape == (len(PROMPTS),)
    assert torch.allclose(batched, alone, atol=1e-5, rtol=0)
    assert batched.std() > 1e-3  # scores differ between texts: the comparison is not trivially constant


def test_reward_scores_read_the_last_real_token(reward_model, tokenizer):
    """The score is the head at the EOS appended to prompt + completion, computed by hand."""
    p, c = PROMPTS[1], " a b"
    ids = tokenizer(p + c + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = reward_model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        expected = float(reward_model.score(hidden)[0])
    got = reward_scores(reward_model, tokenizer, [PROMPTS[0], p], [" a b c d e f g h a b c", c])[1].item()
    assert got == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- metrics


def test_win_rate_by_hand():
    from roads.stages.evaluate import win_rate

    # wins: 0.9>0.1, 0.5=0.5 (half), 0.2<0.7, 1.0>0.0, 0.3=0.3 (half) -> (1 + .5 + 0 + 1 + .5) / 5 = 0.6
    assert win_rate([0.9, 0.5, 0.2, 1.0, 0.3], [0.1, 0.5, 0.7, 0.0, 0.3]) == pytest.approx(0.6)
    assert win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0
    assert win_rate([0.0], [1.0]) == 0.0
    assert win_rate([0.4, 0.4], [0.4, 0.4]) == 0.5
    with pytest.raises(ValueError):
        win_rate([0.1, 0.2], [0.3])  # unpaired lists are an error, not a silent truncation


def test_preference_metrics_by_hand():
    from roads.verifiers import preference_metrics

    chosen = torch.tensor([2.0, 0.5, 1.0, -1.0])
    rejected = torch.tensor([1.0, 0.5, 3.0, -2.0])
    # margins: 1, 0, -2, 1 -> accuracy (1 + 0.5 + 0 + 1) / 4 = 0.625
    m = preference_metrics(chosen, rejected)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["loglik"] == pytest.approx((2 * log_sigmoid(1.0) + log_sigmoid(0.0) + log_sigmoid(-2.0)) / 4)
    assert m["loglik"] == pytest.approx((2 * -0.3132616875 + -0.6931471806 + -2.1269280110) / 4, abs=1e-6)
    assert m["margin"] == pytest.approx(0.0)
    perfect = preference_metrics(torch.tensor([10.0]), torch.tensor([-10.0]))
    assert perfect["accuracy"] == 1.0 and perfect["loglik"] == pytest.approx(0.0, abs=1e-8)


def test_scoring_batches_hold_a_token_budget(model, tokenizer, monkeypatch):
    """Rows x the longest row of a scoring batch stays within LOGIT_TOKENS (64 rows of 512 tokens under a 49,152-token
    vocabulary are 6.4 GB of logits a copy: offline DPO's probe on hh-rlhf ran out of memory); presets' batches, all
    under 128 tokens, are unchanged; the log-probs do not depend on the batching."""
    import roads.generation as generation
    from roads.generation import LOGIT_TOKENS, logit_batches

    assert logit_batches([20] * 200, 64) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert logit_batches([128] * 64, 64) == [(0, 64)] and LOGIT_TOKENS == 64 * 128
    assert logit_batches([512] * 40, 64) == [(0, 16), (16, 32), (32, 40)]
    assert logit_batches([100, 100, 9000, 100], 64) == [(0, 2), (2, 3), (3, 4)]  # a longer row alone
    assert logit_batches([], 64) == []
    lengths = [5, 17, 3, 40, 8, 8, 30]
    for budget in (1, 40, 64, 100):
        batches = logit_batches(lengths, 4, budget)
        assert [i for a, b in batches for i in range(a, b)] == list(range(len(lengths)))  # each row once, in order
        assert all(b - a == 1 or (b - a) * max(lengths[a:b]) <= budget for a, b in batches)
        assert all(b - a <= 4 for a, b in batches)
    prompts = encode(tokenizer, PROMPTS)
    completions = encode(tokenizer, [" a b c", " a", " a d e f g h", " c", " e f", " a a a a a a"])
    whole = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id)
    calls = []  # a budget of 12 tokens: batches of one or two rows
    real = generation.logit_batches
    monkeypatch.setattr(generation, "logit_batches", lambda n, b: calls.append(real(n, b, 12)) or calls[-1])
    split = sequence_logps(model, prompts, completions, pad_id=tokenizer.pad_token_id)
    assert len(calls[0]) > 2 and torch.allclose(split, whole, atol=1e-5, rtol=0)

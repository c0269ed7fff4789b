"""The generative verifier: its judge format and one-token verdicts and the exact antisymmetry of its pairwise score
(roads/judge.py), the ``genrm`` stage on tiny data (outputs, the verifier it leaves, held-out metrics), STaR-SFT and
STaR-DPO rounds that may fall back to the plain labels, and ``gap.validate`` taking a verifier's pairwise margin."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import roads.stages.genrm as genrm
from roads import judge
from roads.artifacts import ArtifactRef, read_json, read_jsonl
from roads.config import StageSpec
from roads.settings import GenRmConfig
from roads.errors import RoadsError
from roads.generation import encode
from roads.models import build_tokenizer, load_policy, new_causal_lm
from roads.runner import execute
from roads.stages.measure_gap import validate
from roads.verifiers import Verifier, load_verifier
from support import Recorder, tiny_data, tiny_sft

N_PAIRS = 6

CORPUS = ["sort: e g h g h g b -> b e g g g h", "sort: h d g g a -> a d g g h", "copy: a b c -> a b c"] * 20


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    return new_causal_lm("tiny", tokenizer, seed=0), tokenizer


# --------------------------------------------------------------------------- the judge format


def test_judge_format_and_one_token_verdicts(tiny):
    _, tokenizer = tiny
    text = judge.judge_prompt("sort: b a ->", " a b", " b a")
    assert text == "sort: b a ->\n[A] a b\n[B] b a\nbetter:"
    assert judge.judge_prompt("p", "x", "y", rationale=True) == "p\n[A]x\n[B]y\nwhy:"
    ids = judge.verdict_ids(tokenizer)
    assert len(set(ids)) == 2
    for verdict, token in zip(judge.VERDICTS, ids):
        assert encode(tokenizer, [verdict]) == [[token]]
        assert encode(tokenizer, [text + verdict])[0] == encode(tokenizer, [text])[0] + [token]  # as trainers see it


def test_a_tokenizer_without_one_token_verdicts_is_refused():
    class Words:  # every string is two tokens
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2] if text else []}

    with pytest.raises(RoadsError, match="not one token"):
        judge.verdict_ids(Words())


def test_both_orders_and_parsing():
    pairs = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    rows = genrm.label_rows(pairs)
    assert rows == [{"prompt": "p\n[A]good\n[B]bad\nbetter:", "completion": "A"},
                    {"prompt": "p\n[A]bad\n[B]good\nbetter:", "completion": "B"}]
    assert [r["completion"] for r in genrm.label_rows(pairs, rationale=True)] == ["\nbetter:A", "\nbetter:B"]
    assert judge.split_judgement("long one\nbetter:B") == ("long one", "B")
    assert judge.split_judgement("x\nbetter:A then\nbetter:B") == ("x\nbetter:A then", "B")  # the last cue
    assert judge.split_judgement("no verdict here A") == ("no verdict here A", None)
    assert judge.split_judgement("r\nbetter:C") == ("r", None)
    assert genrm.split_parts(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert genrm.split_parts([1], 3) == [[1]]


# --------------------------------------------------------------------------- the pairwise score


PROMPTS = ["sort: b a ->", "sort: b a ->", "copy: c ->", "sort: h d ->"]
A = [" a b", " b a", " c", " d h"]
B = [" b a", " a b", " c", " h d"]  # row 2: the same response twice


@pytest.mark.parametrize("options", [{}, {"votes": 3, "temperature": 2.0},
                                     {"rationale": True, "rationale_tokens": 3},
                                     {"rationale": True, "rationale_tokens": 3, "votes": 2}])
def test_compare_is_exactly_antisymmetric(tiny, options):
    model, tokenizer = tiny
    ab = judge.compare(model, tokenizer, PROMPTS, A, B, **options)
    ba = judge.compare(model, tokenizer, PROMPTS, B, A, **options)
    assert ab.shape == (4,) and torch.isfinite(ab).all()
    assert torch.equal(ab, -ba)
    assert ab[2] == 0  # compare(a, a)
    assert torch.equal(judge.compare(model, tokenizer, PROMPTS, A, A, **options), torch.zeros(4, dtype=torch.float64))
    if "votes" not in options:  # an untrained model still has some (tiny) opinion
        assert (ab[[0, 1, 3]] != 0).all()


def test_compare_is_half_the_difference_of_the_two_orders(tiny):
    model, tokenizer = tiny
    logps = judge.verdict_logps(model, tokenizer, [judge.judge_prompt(PROMPTS[0], A[0], B[0]),
                                                   judge.judge_prompt(PROMPTS[0], B[0], A[0])])
    assert (logps < 0).all()
    d_ab, d_ba = (logps[:, 0] - logps[:, 1]).double().tolist()
    value = float(judge.compare(model, tokenizer, PROMPTS[:1], A[:1], B[:1])[0])
    assert value == pytest.approx((d_ab - d_ba) / 2, abs=1e-5)


def test_votes_give_clipped_log_odds(tiny):
    model, tokenizer = tiny
    votes = 4
    d = judge.judge_log_odds(model, tokenizer, PROMPTS, A, B, rationale=False, votes=votes, rationale_tokens=1,
                             temperature=1.0, seed=0)
    allowed = [math.log(s / (votes - s)) for s in (0.5, 1, 2, 3)] + [math.log(3.5 / 0.5)]
    assert all(min(abs(v - a) for a in allowed) < 1e-9 for v in d.tolist())


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    data = tiny_data(store, N_PAIRS, n_val_pairs=4)
    return {"data": data, "sft": tiny_sft(store, data)}


def spec(**params) -> StageSpec:
    cfg = GenRmConfig(**{"epochs": 1, "batch_size": 6, "logging_steps": 1, "val_batch_size": 16, **params})
    return StageSpec(stage="genrm", params=cfg.model_dump(), seed=0)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    tracker = Recorder()
    return execute(spec(), inputs, tmp_path_factory.mktemp("genrm-store"), tracker), tracker


def test_stage_outputs_and_metrics(trained, inputs):
    result, tracker = trained
    out = Path(result.artifact.path)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trained.json", "verifier.json",
                 "validation.json"):
        assert (out / name).is_file(), name
    assert read_json(out / "verifier.json") == {"kind": "generative", "votes": 1, "rationale": False,
                                                "rationale_tokens": 16, "temperature": 1.0}
    assert read_json(out / "trained.json")["train_examples"] == N_PAIRS  # pairs, though SFT saw both orders
    assert result.files == ["validation.json"]
    m = result.metrics
    for key in ("genrm/val_accuracy", "genrm/val_loglik", "genrm/val_margin", "genrm/train_loss"):
        assert key in m and math.isfinite(m[key]), key
    assert 0.0 <= m["genrm/val_accuracy"] <= 1.0 and m["genrm/val_loglik"] <= 0.0
    assert read_json(out / "validation.json")["accuracy"] == pytest.approx(m["genrm/val_accuracy"], abs=1e-6)
    assert any("held-out accuracy" in msg for msg in tracker.messages)
    # both orders of 6 pairs, 6 per batch: 2 steps
    assert [step for logs, step in tracker.logs if "genrm/loss" in logs] == [1, 2]


def test_training_moves_the_verdict_probabilities(trained, inputs):
    result, _ = trained
    rows = read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl")
    judges = [r["prompt"] for r in genrm.label_rows(rows)]
    mass = {}
    for name, path in (("sft", inputs["sft"].path), ("genrm", result.artifact.path)):
        model, tokenizer = load_policy(path)
        mass[name] = float(judge.verdict_logps(model, tokenizer, judges).exp().sum(-1).mean())
    assert mass["genrm"] > mass["sft"]  # SFT on the verdicts puts probability on "A" and "B"


def test_the_saved_verifier_is_generative(trained, inputs):
    result, _ = trained
    verifier = load_verifier("genrm", result.artifact.path)
    assert verifier.kind == "generative" and verifier.compare is not None
    assert verifier.train_examples == N_PAIRS and verifier.parameters > 0
    val = read_jsonl(Path(inputs["data"].path) / "pairs_val.jsonl")
    prompts, chosen, rejected = [r["prompt"] for r in val], [r["chosen"] for r in val], [r["rejected"] for r in val]
    margin = verifier.compare(prompts, chosen, rejected)
    assert torch.equal(margin, -verifier.compare(prompts, rejected, chosen))
    # gap.validate reads the same margins the stage validated with
    summary, rows = validate(verifier, val)
    assert summary["accuracy"] == pytest.approx(result.metrics["genrm/val_accuracy"], abs=1e-6)
    assert summary["loglik"] == pytest.approx(result.metrics["genrm/val_loglik"], abs=1e-6)
    assert [r["margin"] for r in rows] == [round(float(d), 6) for d in margin]

    # pointwise: log-odds against the first completion given for each prompt
    p, q = prompts[0], prompts[1]
    scores = verifier.score([p, p, q, p, q], [chosen[0], rejected[0], rejected[1], chosen[0], chosen[1]])
    assert scores[0] == 0 and scores[2] == 0 and scores[3] == 0  # the references, and a repeat of one
    assert scores[1] == verifier.compare([p], [rejected[0]], [chosen[0]])[0]
    assert scores[4] == verifier.compare([q], [chosen[1]], [rejected[1]])[0]


def test_gap_validate_uses_compare_when_the_verifier_has_one():
    def score(prompts, completions):
        raise AssertionError("validate must not score pointwise when it can compare")

    def compare(prompts, a, b):
        return torch.tensor([2.0 if x == "good" else -1.0 for x in a]) * torch.tensor([1.0 if y != x else 0.0
                                                                                      for x, y in zip(a, b)])

    verifier = Verifier("judge", "generative", score, compare=compare)
    val = [{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "p", "chosen": "meh", "rejected": "bad"},
           {"prompt": "p", "chosen": "bad", "rejected": "bad"}]
    summary, rows = validate(verifier, val)
    assert [r["margin"] for r in rows] == [2.0, -1.0, 0.0]
    assert [r["correct"] for r in rows] == [1.0, 0.0, 0.5]
    assert summary["accuracy"] == pytest.approx(0.5)
    expected = (math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1))) + math.log(0.5)) / 3
    assert summary["loglik"] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["star_sft", "star_dpo"])
def test_star_rounds_run(inputs, tmp_path, method):
    tracker = Recorder()
    result = execute(spec(method=method, star_iterations=1, star_samples=2, rationale_tokens=4), inputs, tmp_path,
                     tracker)
    out = Path(result.artifact.path)
    assert read_json(out / "verifier.json")["rationale"] is True
    assert read_json(out / "verifier.json")["kind"] == "generative"
    rounds = read_json(out / "star.json")
    assert len(rounds) == 1 and rounds[0]["judge_prompts"] == 2 * N_PAIRS and rounds[0]["samples"] == 4 * N_PAIRS
    m = result.metrics
    assert m["genrm/star_fallback_rounds"] == float(rounds[0]["fallback"])
    if rounds[0]["fallback"]:  # an SFT model that never saw the judge format rarely writes a verdict
        assert any("plain labels" in msg for msg in tracker.messages)
    for key in ("genrm/val_accuracy", "genrm/val_loglik", "genrm/star_correct"):
        assert math.isfinite(m[key]), key
    assert result.files == ["validation.json", "star.json"]
    assert load_verifier(method, out).compare is not None


def test_star_round_sorts_judgements_by_their_verdicts(monkeypatch):
    from roads.generation import Completion

    texts = {"A": ["why\nbetter:A", "hmm\nbetter:B"], "B": ["nothing", "x\nbetter:B"]}

    def fake_sample(model, tokenizer, prompts, *, n, **kwargs):
        assert n == 2
        return [[Completion(t, (), True) for t in texts[label]] for label in ("A", "B")]

    monkeypatch.setattr(genrm, "sample", fake_sample)
    monkeypatch.setattr(genrm, "judgement_tokens", lambda tokenizer, k: k + 3)
    cfg = GenRmConfig(star_samples=2, rationale_tokens=2)
    sft_rows, dpo_pairs, counts = genrm.star_round(None, None, cfg, [{"prompt": "p", "chosen": "c", "rejected": "r"}],
                                                   seed=0)
    first, second = genrm.both_orders([{"prompt": "p", "chosen": "c", "rejected": "r"}], rationale=True)[0]
    assert sft_rows == [{"prompt": first, "completion": "why\nbetter:A"},
                        {"prompt": second, "completion": "x\nbetter:B"}]
    assert dpo_pairs == [{"prompt": first, "chosen": "why\nbetter:A", "rejected": "hmm\nbetter:B"},
                         {"prompt": second, "chosen": "x\nbetter:B", "rejected": "nothing"}]
    assert counts == {"judge_prompts": 2, "samples": 4, "with_verdict": 3, "correct": 2}


@pytest.mark.parametrize("method", ["star_sft", "star_dpo"])
def test_a_judge_from_a_restricted_policy_judges_with_the_whole_vocabulary(inputs, tmp_path, monkeypatch, method):
    """On the calibrated testbed the SFT policy may sample only its task's symbols (generation_config.suppress_tokens);
    its GenRM must still be able to write a rationale and a verdict: STaR samples unrestricted, and the saved judge
    (STaR-DPO trains from the start policy's folder) carries no restriction either."""
    from roads.models import restrict_vocab, suppressed_tokens

    model, tokenizer = load_policy(inputs["sft"].path)
    assert restrict_vocab(model, tokenizer, "abc")  # the policy may write only a, b, c
    model.save_pretrained(tmp_path / "restricted")
    tokenizer.save_pretrained(tmp_path / "restricted")
    restricted = {"data": inputs["data"], "sft": ArtifactRef(str(tmp_path / "restricted"), "restricted")}
    seen = []
    real_sample = genrm.sample

    def recording_sample(model, *args, **kwargs):
        seen.append(suppressed_tokens(model))
        return real_sample(model, *args, **kwargs)

    monkeypatch.setattr(genrm, "sample", recording_sample)
    result = execute(spec(method=method, star_iterations=1, star_samples=2, rationale_tokens=4), restricted,
                     tmp_path / "store")
    assert seen == [[]]  # STaR's one round sampled its judgements without the policy's restriction
    judge_model, _ = load_policy(result.artifact.path)
    assert suppressed_tokens(judge_model) == []

"""Tests for roads.data.synthetic: hand-checked gold rewards, why each family belongs to its class, data generation
(determinism, held-out prompts, label noise) and the Bradley–Terry labeller."""

from __future__ import annotations

import itertools
import math
from collections import Counter
import random

import pytest

from roads.data.synthetic import (
    SyntheticTask,
    bradley_terry_prefers_first,
    coverage,
    generate,
    lcs_length,
    order_score,
    rouge_l,
)
from roads.errors import DataError

GAP = SyntheticTask("gap")
SHORT = SyntheticTask("short")
HIDDEN = SyntheticTask("hidden")


def small_data(task: SyntheticTask, seed: int = 0, **kw) -> dict[str, list[dict]]:
    args = dict(n_sft=50, n_pairs=50, n_val_pairs=20, n_eval_prompts=20, demo_noise=0.3, behaviour_noise=0.5,
                bt_temperature=0.1)
    args.update(kw)
    return generate(task, seed=seed, **args)


# --------------------------------------------------------------------------- hand-checked gold rewards


@pytest.mark.parametrize(
    "response, expected",
    [
        # target of "c a b" is [a, b, c];  r* = ½·order + ½·coverage
        (" a b c", 1.0),  # order 2/2 = 1, coverage 3/3 = 1 -> ½ + ½ = 1
        (" a c b", 0.75),  # order: a<=c yes, c<=b no -> 1/2; coverage 3/3 -> ¼ + ½ = 0.75
        (" a b", 0.5 + 0.5 * 2 / 3),  # order 1/1; coverage 2/max(3,2) = 2/3 -> ½ + ⅓ = 0.8333
        (" c b a", 0.5),  # order 0/2; coverage 1 -> 0.5
        (" a b c c", 0.5 + 0.5 * 3 / 4),  # order 3/3; coverage 3/max(3,4) = 3/4 -> 0.875 (extra symbols cost)
        (" z", 0.0),  # z is outside the alphabet: order 0 (single invalid symbol); coverage 0/3 -> 0
        (" a z b c", 0.5 * 1 / 3 + 0.5 * 3 / 4),  # z breaks a-z and z-b: order 1/3 (b<=c); coverage 3/4 -> 0.5417
        ("", 0.0),  # empty: order 0, coverage 0/3 -> 0
    ],
)
def test_gap_gold_reward_by_hand(response, expected):
    assert GAP.gold_reward("sort: c a b ->", response) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "response, expected",
    [
        # target of "d b c a" is the two smallest, in order: [a, b]
        (" a b", 1.0),  # order 1/1, coverage 2/2 -> 1
        (" b a", 0.5),  # order: b<=a no -> 0/1; coverage 2/2 -> 0 + ½ = 0.5
        (" a", 0.75),  # single valid symbol: order 1; coverage 1/max(2,1) = ½ -> ½ + ¼ = 0.75
        (" a b c", 0.5 + 0.5 * 2 / 3),  # order 2/2; coverage 2/max(2,3) = 2/3 -> 0.8333
        (" c d", 0.5),  # ordered, but neither is in the target: order 1, coverage 0 -> 0.5
        ("", 0.0),
    ],
)
def test_short_gold_reward_by_hand(response, expected):
    assert SHORT.gold_reward("min2: d b c a ->", response) == pytest.approx(expected, abs=1e-12)


def test_short_target_is_two_smallest_in_order():
    assert SHORT.target(list("dbca")) == ["a", "b"]
    assert SHORT.target(list("cbcb")) == ["b", "b"]  # duplicates count
    assert SHORT.response(SHORT.target(list("dbca"))) == " a b"


def test_hidden_gold_reward_by_hand():
    table = HIDDEN.substitution()
    assert sorted(table) == sorted(table.values()) == list("abcdefgh")  # a permutation of the alphabet
    prompt = "code: a b c d ->"
    z = [table[s] for s in "abcd"]  # the hidden reference z(x); 4 distinct symbols
    assert HIDDEN.target(list("abcd")) == z
    r = lambda ys: HIDDEN.gold_reward(prompt, SyntheticTask.response(ys))  # noqa: E731
    assert r(z) == 1.0
    # reversed: LCS of 4 distinct symbols and their reverse = 1 -> P = R = 1/4 -> F1 = 1/4
    assert r(z[::-1]) == pytest.approx(0.25)
    # first half: LCS 2, P = 2/2, R = 2/4 -> F1 = 2·1·½/(1+½) = 2/3
    assert r(z[:2]) == pytest.approx(2 / 3)
    # target plus two extra symbols not in it: LCS 4, P = 4/6, R = 1 -> F1 = 2·(2/3)/(5/3) = 0.8
    extra = [s for s in "abcdefgh" if s not in z][:2]
    assert r(z + extra) == pytest.approx(0.8)
    assert r([]) == 0.0
    # the prompt itself (unsubstituted) only scores what the permutation happens to leave in order
    assert r(list("abcd")) == pytest.approx(rouge_l(z, list("abcd")))


def test_lcs_rouge_order_coverage_small_cases():
    assert lcs_length(list("abcde"), list("ace")) == 3
    assert lcs_length(list("abc"), list("cba")) == 1
    assert lcs_length([], list("abc")) == 0
    assert lcs_length(list("aab"), list("aba")) == 2
    # rouge_l: LCS 3, P = 3/3, R = 3/5 -> F1 = 2·0.6/1.6 = 0.75
    assert rouge_l(list("abcde"), list("ace")) == pytest.approx(0.75)
    assert rouge_l(list("abc"), list("abc")) == 1.0
    assert rouge_l(list("abc"), list("xyz")) == 0.0
    assert rouge_l([], []) == 0.0
    assert order_score([], "abc") == 0.0
    assert order_score(["a"], "abc") == 1.0
    assert order_score(["z"], "abc") == 0.0
    assert order_score(list("abca"), "abc") == pytest.approx(2 / 3)  # a<=b, b<=c, c>a
    assert order_score(list("aa"), "abc") == 1.0  # ties are in order
    assert coverage([], []) == 1.0
    assert coverage(list("aab"), list("ab")) == pytest.approx(2 / 3)
    assert coverage(list("ab"), list("aabb")) == pytest.approx(2 / 4)
    assert coverage(list("ab"), []) == 0.0


def test_gold_reward_is_one_exactly_at_the_target():
    rng = random.Random(0)
    for task in (GAP, SHORT, HIDDEN):
        for _ in range(200):
            xs = task.sample_prompt_symbols(rng)
            p = task.prompt(xs)
            assert task.parse_prompt(p) == xs
            assert task.gold_reward(p, task.response(task.target(xs))) == 1.0
            other = task.demonstrate(xs, 0.5, rng)
            r = task.gold_reward(p, task.response(other))
            assert 0.0 <= r <= 1.0
            if r == 1.0:
                assert other == task.target(xs)


def test_parse_prompt_rejects_other_family():
    with pytest.raises(DataError, match="gap"):
        GAP.parse_prompt("min2: a b ->")


# --------------------------------------------------------------------------- why each family belongs to its class


def _one_symbol_changes(task: SyntheticTask, rng: random.Random, n: int):
    """(xs, i, xs') pairs where xs' differs from xs at position i only."""
    out = []
    while len(out) < n:
        xs = task.sample_prompt_symbols(rng)
        i = rng.randrange(len(xs))
        new = rng.choice([s for s in task.symbols if s != xs[i]])
        out.append((xs, i, xs[:i] + [new] + xs[i + 1:]))
    return out


def _changes_elsewhere(task: SyntheticTask, xs, i, ys) -> bool:
    """Does the target change at some position other than i (length changes count)?"""
    a, b = task.target(xs), task.target(ys)
    if len(a) != len(b):
        return True
    return any(u != v for j, (u, v) in enumerate(zip(a, b)) if j != i)


def test_gap_class_simple_verifier_long_global_generation():
    rng = random.Random(0)
    # Verification: r* depends on the prompt only through its multiset of symbols (a count), plus local adjacent
    # checks of the response -- shuffling the prompt never changes r*.
    for _ in range(300):
        xs = GAP.sample_prompt_symbols(rng)
        y = GAP.response(GAP.demonstrate(xs, 0.5, rng))
        shuffled = list(xs)
        rng.shuffle(shuffled)
        assert GAP.gold_reward(GAP.prompt(xs), y) == GAP.gold_reward(GAP.prompt(shuffled), y)
    # Generation: the target at a position depends on the whole prompt. Hand example: "c a b" -> "a b c";
    # change only position 1 (a -> d): "c d b" -> "b c d", which differs at every position, not just one.
    assert GAP.target(list("cab")) == list("abc")
    assert GAP.target(list("cdb")) == list("bcd")
    changes = _one_symbol_changes(GAP, rng, 500)
    elsewhere = sum(_changes_elsewhere(GAP, xs, i, ys) for xs, i, ys in changes)
    assert elsewhere / len(changes) > 0.5
    # Horizon: the response is as long as the prompt, up to max_len.
    lengths = {len(GAP.target(GAP.sample_prompt_symbols(rng))) for _ in range(500)}
    assert max(lengths) == GAP.max_len and min(lengths) == GAP.min_len


def test_short_class_horizon_two():
    rng = random.Random(1)
    for task in (SHORT, SyntheticTask("short", alphabet=20, min_len=2, max_len=12)):
        assert {len(task.target(task.sample_prompt_symbols(rng))) for _ in range(500)} == {2}
    data = small_data(SHORT)
    assert {len(r["target"].split()) for r in data["eval_prompts"]} == {2}


def test_hidden_class_verifier_needs_the_table():
    rng = random.Random(2)
    other = SyntheticTask("hidden", secret=HIDDEN.secret + 1)
    assert other.substitution() != HIDDEN.substitution()
    # r*(x, y) changes when only the secret changes: the verifier needs the hidden table.
    changed = 0
    for _ in range(200):
        xs = HIDDEN.sample_prompt_symbols(rng)
        p, y = HIDDEN.prompt(xs), HIDDEN.response(HIDDEN.target(xs))
        assert HIDDEN.gold_reward(p, y) == 1.0
        changed += other.gold_reward(p, y) != 1.0
    assert changed >= 190
    # (contrast: the gap family ignores the secret entirely)
    xs = list("cab")
    assert SyntheticTask("gap", secret=1).gold_reward(GAP.prompt(xs), " a b c") == SyntheticTask(
        "gap", secret=2).gold_reward(GAP.prompt(xs), " a b c")
    # Generation: the target is a per-position function of the prompt -- changing one prompt symbol changes the
    # target at that position only -- over the same horizon as gap (len(target) == len(prompt) up to max_len).
    for xs, i, ys in _one_symbol_changes(HIDDEN, rng, 500):
        assert not _changes_elsewhere(HIDDEN, xs, i, ys)
        assert HIDDEN.target(xs)[i] != HIDDEN.target(ys)[i]
    lengths = set()
    for _ in range(500):
        xs = HIDDEN.sample_prompt_symbols(rng)
        assert len(HIDDEN.target(xs)) == len(xs)
        lengths.add(len(xs))
    assert max(lengths) == HIDDEN.max_len


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("task", [GAP, SHORT, HIDDEN], ids=lambda t: t.family)
def test_generate_deterministic_from_seed(task):
    a, b, c = small_data(task, seed=3), small_data(task, seed=3), small_data(task, seed=4)
    assert a == b
    assert a != c
    assert a["sft"] != c["sft"] and a["eval_prompts"] != c["eval_prompts"]


@pytest.mark.parametrize("task", [GAP, SHORT, HIDDEN], ids=lambda t: t.family)
def test_generate_sizes_fields_and_held_out_prompts(task):
    data = small_data(task, seed=0, n_sft=120, n_pairs=90, n_val_pairs=30, n_eval_prompts=40, n_sft_val=25,
                      n_select_pairs=15)
    assert {k: len(v) for k, v in data.items()} == {"sft": 120, "sft_val": 25, "pairs_train": 90, "pairs_val": 30,
                                                   "pairs_select": 15, "eval_prompts": 40}
    select = {r["prompt"] for r in data["pairs_select"]}
    assert not select & ({r["prompt"] for r in data["sft"] + data["sft_val"] + data["pairs_train"]
                          + data["pairs_val"] + data["eval_prompts"]})
    sft_val = {r["prompt"] for r in data["sft_val"]}
    assert all(set(r) == {"prompt", "completion"} for r in data["sft_val"])
    assert not sft_val & ({r["prompt"] for r in data["sft"]} | {r["prompt"] for r in data["pairs_train"]})
    assert not sft_val & ({r["prompt"] for r in data["pairs_val"]} | {r["prompt"] for r in data["eval_prompts"]})
    assert all(set(r) == {"prompt", "completion"} for r in data["sft"])
    pair_keys = {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"}
    assert all(set(r) == pair_keys for r in data["pairs_train"] + data["pairs_val"])
    assert all(set(r) == {"prompt", "target"} for r in data["eval_prompts"])
    train = {r["prompt"] for r in data["sft"]} | {r["prompt"] for r in data["pairs_train"]}
    evals = [r["prompt"] for r in data["eval_prompts"]]
    vals = {r["prompt"] for r in data["pairs_val"]}
    assert not train & set(evals)
    assert not train & vals
    assert not vals & set(evals)
    assert len(set(evals)) == len(evals)
    for r in data["pairs_train"] + data["pairs_val"]:
        assert r["chosen_gold"] == task.gold_reward(r["prompt"], r["chosen"])
        assert r["rejected_gold"] == task.gold_reward(r["prompt"], r["rejected"])
    for r in data["eval_prompts"]:
        assert task.gold_reward(r["prompt"], r["target"]) == 1.0


@pytest.mark.parametrize("task", [GAP, SHORT, HIDDEN], ids=lambda t: t.family)
def test_noiseless_labels_prefer_higher_gold(task):
    data = small_data(task, n_pairs=300, bt_temperature=0.0)
    assert all(r["chosen_gold"] >= r["rejected_gold"] for r in data["pairs_train"] + data["pairs_val"])
    assert any(r["chosen_gold"] > r["rejected_gold"] for r in data["pairs_train"])


def test_hot_labels_are_coin_flips():
    data = small_data(GAP, n_sft=1, n_pairs=2000, n_val_pairs=1, n_eval_prompts=1, bt_temperature=1000.0)
    decided = [r for r in data["pairs_train"] if r["chosen_gold"] != r["rejected_gold"]]
    assert len(decided) > 1000
    agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in decided) / len(decided)
    assert 0.3 < agree < 0.7


def test_default_temperature_labels_mostly_agree_with_gold():
    data = small_data(GAP, n_sft=1, n_pairs=1000, bt_temperature=0.1)
    decided = [r for r in data["pairs_train"] if r["chosen_gold"] != r["rejected_gold"]]
    agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in decided) / len(decided)
    assert agree > 0.75


@pytest.mark.parametrize("task", [GAP, SHORT, HIDDEN], ids=lambda t: t.family)
def test_noiseless_demonstrator_writes_the_target(task):
    data = small_data(task, n_sft=200, demo_noise=0.0)
    golds = [task.gold_reward(r["prompt"], r["completion"]) for r in data["sft"]]
    assert sum(golds) / len(golds) == 1.0
    for r in data["sft"]:
        assert r["completion"] == task.response(task.target(task.parse_prompt(r["prompt"])))
    noisy = small_data(task, n_sft=200, demo_noise=0.3)
    assert sum(task.gold_reward(r["prompt"], r["completion"]) for r in noisy["sft"]) / 200 < 1.0


def test_prompt_space_too_small_for_held_out_raises():
    tiny = SyntheticTask("gap", alphabet=2, min_len=2, max_len=2)  # only 4 distinct prompts
    with pytest.raises(DataError, match="too small"):
        generate(tiny, seed=0, n_sft=1, n_pairs=1, n_val_pairs=1, n_eval_prompts=10, demo_noise=0.0,
                 behaviour_noise=0.0, bt_temperature=0.0)


class _Hang(Exception):
    pass


def test_no_training_prompts_left_raises_instead_of_hanging():
    class Counting(SyntheticTask):
        def sample_prompt_symbols(self, rng):
            object.__setattr__(self, "calls", getattr(self, "calls", 0) + 1)
            if self.calls > 100_000:
                raise _Hang("still drawing prompts after 100k draws")
            return super().sample_prompt_symbols(rng)

    # alphabet 2, length 2: 4 prompts ("a a", "a b", "b a", "b b"); 2 eval + 2 val prompts hold all of them out
    tiny = Counting("gap", alphabet=2, min_len=2, max_len=2)
    with pytest.raises(DataError):
        generate(tiny, seed=0, n_sft=1, n_pairs=1, n_val_pairs=2, n_eval_prompts=2, demo_noise=0.0,
                 behaviour_noise=0.0, bt_temperature=0.0)


# --------------------------------------------------------------------------- Bradley–Terry labeller


@pytest.mark.parametrize("r1, r2, tau", [(0.7, 0.4, 0.2), (0.4, 0.7, 0.2), (0.5, 0.5, 0.1), (1.0, 0.0, 0.5),
                                         (0.6, 0.55, 0.1), (0.2, 0.9, 1.0)])
def test_bradley_terry_frequency_matches_sigmoid(r1, r2, tau):
    rng = random.Random(0)
    n = 20_000
    freq = sum(bradley_terry_prefers_first(r1, r2, tau, rng) for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-(r1 - r2) / tau))
    assert abs(freq - expected) < 0.03


def test_bradley_terry_zero_temperature_and_extremes():
    rng = random.Random(0)
    assert bradley_terry_prefers_first(0.6, 0.5, 0.0, rng) is True
    assert bradley_terry_prefers_first(0.5, 0.6, 0.0, rng) is False
    assert bradley_terry_prefers_first(0.5, 0.5, 0.0, rng) is True  # ties: y1
    # huge |Δ/τ| must not overflow
    assert bradley_terry_prefers_first(0.0, 1.0, 1e-6, rng) is False
    assert bradley_terry_prefers_first(1.0, 0.0, 1e-6, rng) is True


# --------------------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(family="nope"), "unknown synthetic family"),
        (dict(family="gap", min_len=6, max_len=4), "min_len"),
        (dict(family="gap", min_len=1, max_len=4), "min_len"),
        (dict(family="gap", alphabet=1), "alphabet"),
        (dict(family="short", alphabet=27), "alphabet"),
    ],
)
def test_invalid_task_raises_data_error(kwargs, match):
    with pytest.raises(DataError, match=match) as info:
        SyntheticTask(**kwargs)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_task_is_frozen():
    with pytest.raises(AttributeError):
        GAP.alphabet = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- shuffle: the plan-free sorting demonstrator

SHUFFLE = SyntheticTask("shuffle")


def test_shuffle_scores_like_gap_by_hand():
    xs = ["c", "a", "b", "a"]
    prompt = SHUFFLE.prompt(xs)
    assert prompt == "order: c a b a ->"
    assert SHUFFLE.gold_reward(prompt, " a a b c") == 1.0  # the target: sorted
    assert SHUFFLE.gold_reward(prompt, " c b a a") == pytest.approx(0.5 * (1 / 3) + 0.5)  # all there, 1 of 3 in order
    assert SHUFFLE.gold_reward(prompt, " a b c") == pytest.approx(0.5 + 0.5 * 3 / 4)  # ordered, one symbol missing
    for response in (" a a b c", " c b a a", " b a", " z a"):
        assert SHUFFLE.gold_reward(prompt, response) == GAP.gold_reward(GAP.prompt(xs), response)


def test_the_shuffle_demonstrator_has_no_plan():
    """Why shuffle is a gap-class family: at noise 0 the demonstrator writes every permutation of the prompt's
    symbols equally often, so its likelihood is the same for all of them, while r* runs from its minimum to 1."""
    rng = random.Random(0)
    xs = ["d", "b", "a", "c"]
    counts = Counter(tuple(SHUFFLE.demonstrate(xs, 0.0, rng)) for _ in range(24000))
    assert set(counts) == set(itertools.permutations(xs))  # all 24 orders, nothing else
    assert max(counts.values()) / min(counts.values()) < 1.2  # uniform: 1000 each, within noise
    rewards = {SHUFFLE.gold_reward(SHUFFLE.prompt(xs), SHUFFLE.response(list(p))) for p in counts}
    assert min(rewards) == 0.5 and max(rewards) == 1.0  # same likelihood, rewards from 0.5 to 1
    assert sum(p == ("a", "b", "c", "d") for p in counts) == 1  # the target is one order among 24


def test_shuffle_data_differs_from_gap_only_in_the_demonstrations():
    s, g = small_data(SHUFFLE, n_sft=200), small_data(GAP, n_sft=200)
    assert [r["prompt"].split(":", 1)[1] for r in s["eval_prompts"]] == [r["prompt"].split(":", 1)[1]
                                                                          for r in g["eval_prompts"]]
    mean = lambda task, rows: sum(task.gold_reward(r["prompt"], r["completion"]) for r in rows) / len(rows)
    assert mean(SHUFFLE, s["sft"]) < mean(GAP, g["sft"]) - 0.1  # shuffled demonstrations are far from sorted

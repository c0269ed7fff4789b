"""Tests for roads.data.star (the ``star`` family: path-finding on a star graph): hand-checked gold rewards, the
prompt format, the plan-free demonstrator, data generation, and why the family has a generation–verification gap
(the demonstrator's likelihood does not determine r*)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from roads.data import gold_reward_fn, synthetic_task
from roads.data.star import StarGraph, StarTask
from roads.data.synthetic import SyntheticTask, generate
from roads.errors import DataError
from roads.settings import TaskConfig

STAR = StarTask(alphabet=12, degree=3, arm_len=2)
# centre a; arms a>b>c, a>d>e, a>f>g; goal g, so the target is a f g
PROMPT = "path: d e , a b , a f , b c , a d , f g | a g ->"


def star_data(task: StarTask = STAR, seed: int = 0, **kw) -> dict[str, list[dict]]:
    args = dict(n_sft=200, n_pairs=200, n_val_pairs=50, n_eval_prompts=50, demo_noise=0.3, behaviour_noise=0.5,
                bt_temperature=0.1, n_sft_val=20)
    args.update(kw)
    return generate(task, seed=seed, **args)


# --------------------------------------------------------------------------- hand-checked gold rewards


@pytest.mark.parametrize(
    "response, expected",
    [
        # r* = ⅓·W + ⅔·P.  W = valid steps / max(n, 3);  P = (common prefix with [a, f, g] − 1)⁺ / max(2, n − 1)
        (" a f g", 1.0),  # the target: W 3/3, P 2/2
        (" a b c", 1 / 3),  # wrong arm, clean walk: W 3/3, P 0/2 -> the plan is worth the other ⅔
        (" a d e", 1 / 3),  # the other wrong arm
        (" a f", 1 / 3 * 2 / 3 + 2 / 3 * 1 / 2),  # right arm, stops short: W 2/3, P 1/max(2,1) -> 5/9
        (" a f c", 1 / 3 * 2 / 3 + 2 / 3 * 1 / 2),  # right arm, invalid last edge f>c: W 2/3, P 1/2 -> 5/9
        (" a b g", 1 / 3 * 2 / 3 + 0.0),  # wrong arm, then the goal: b>g is not an edge; W 2/3, P 0 -> 2/9
        (" a g", 1 / 3 * 1 / 3),  # copies the goal: a>g is not an edge; W 1/3, P 0 -> 1/9
        (" f g", 1 / 3 * 1 / 3),  # skips the centre: only f>g is valid; W 1/3, P 0 (no prefix) -> 1/9
        (" a f g g", 1 / 3 * 3 / 4 + 2 / 3 * 2 / 3),  # extra symbol: g>g invalid, W 3/4; P 2/max(2,3) -> 25/36
        (" a f g z", 1 / 3 * 3 / 4 + 2 / 3 * 2 / 3),  # z is outside the alphabet: the same as any invalid extra step
        (" a z g", 1 / 3 * 1 / 3),  # z outside the alphabet, mid-path: a>z, z>g invalid; W 1/3, P 0 -> 1/9
        (" a f k g", 1 / 3 * 2 / 4 + 2 / 3 * 1 / 3),  # k in the alphabet, not in the graph: W 2/4, P 1/3 -> 7/18
        (" a b c d e", 1 / 3 * 4 / 5),  # walks on past a leaf: c>d invalid, d>e valid; W 4/5, P 0 -> 4/15
        (" z", 0.0),  # W 0/3, P 0
        ("", 0.0),  # empty
    ],
)
def test_star_gold_reward_by_hand(response, expected):
    assert STAR.gold_reward(PROMPT, response) == pytest.approx(expected, abs=1e-12)


def test_star_components_by_hand():
    xs = STAR.parse_prompt(PROMPT)
    assert STAR.target(xs) == ["a", "f", "g"]
    assert STAR.walk_score(xs, list("abc")) == 1.0 and STAR.plan_score(xs, list("abc")) == 0.0
    assert STAR.walk_score(xs, list("afg")) == 1.0 and STAR.plan_score(xs, list("afg")) == 1.0
    assert STAR.picks_goal_arm(PROMPT, " a f c") and not STAR.picks_goal_arm(PROMPT, " a b c")
    assert not STAR.picks_goal_arm(PROMPT, " f g")  # must start at the centre


def test_star_target_scores_one_and_every_other_clean_walk_one_third():
    rng = random.Random(0)
    for task in (STAR, StarTask(alphabet=16, degree=4, arm_len=3)):
        for _ in range(200):
            xs = task.sample_prompt_symbols(rng)
            prompt = task.prompt(xs)
            assert task.gold_reward(prompt, task.response(task.target(xs))) == 1.0
            walks = [[xs.centre] + arm for arm in xs.arms()]
            assert len(walks) == task.degree and all(len(w) == task.arm_len + 1 for w in walks)
            scores = sorted(task.gold_reward(prompt, task.response(w)) for w in walks)
            assert scores == pytest.approx([1 / 3] * (task.degree - 1) + [1.0])


def test_star_gold_reward_stays_in_unit_interval_on_noisy_responses():
    rng = random.Random(1)
    for _ in range(500):
        xs = STAR.sample_prompt_symbols(rng)
        ys = STAR.demonstrate(xs, 0.7, rng)
        r = STAR.gold_reward(STAR.prompt(xs), STAR.response(ys))
        assert 0.0 <= r <= 1.0
        assert (r == 1.0) == (ys == STAR.target(xs))


# --------------------------------------------------------------------------- prompt format and config


def test_star_prompt_round_trips_and_shuffles_the_edges():
    rng = random.Random(2)
    first_edges_from_centre = 0
    for _ in range(300):
        xs = STAR.sample_prompt_symbols(rng)
        prompt = STAR.prompt(xs)
        assert prompt.startswith("path: ") and prompt.endswith(" ->")
        assert STAR.parse_prompt(prompt) == xs
        names = {xs.centre} | {v for _, v in xs.edges}
        assert len(names) == 1 + 3 * 2 and names <= set(STAR.symbols)  # distinct node names from the alphabet
        assert xs.goal in {arm[-1] for arm in xs.arms()}  # the goal is a leaf
        first_edges_from_centre += xs.edges[0][0] == xs.centre
    # the first listed edge leaves the centre for 3 of the 6 edges: about half the time, not always (shuffled)
    assert 0.35 < first_edges_from_centre / 300 < 0.65


@pytest.mark.parametrize("prompt", ["sort: a b ->", "path: a b , a c ->", "path: a b a , a c | a c ->",
                                    "path: a b , a c | a ->", "path: a b , a c | a e ->",
                                    "path: a>b a>c | a c ->"])
def test_star_malformed_prompt_raises(prompt):
    with pytest.raises(DataError):
        STAR.gold_reward(prompt, " a b")


def test_star_alphabet_too_small_names_the_fix():
    with pytest.raises(DataError, match=r"alphabet 6 .* 7 nodes .* set alphabet between 7 and 26") as info:
        StarTask(alphabet=6, degree=3, arm_len=2)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    with pytest.raises(DataError, match="alphabet"):
        synthetic_task(TaskConfig(family="star", alphabet=8, degree=3, arm_len=3))  # needs 10
    with pytest.raises(DataError, match="StarTask"):
        SyntheticTask("star")  # the symbol-list class cannot build a graph task


def test_synthetic_task_builds_star_from_a_task_config():
    task = synthetic_task(TaskConfig(family="star", alphabet=16, degree=4, arm_len=3))
    assert isinstance(task, StarTask) and (task.alphabet, task.degree, task.arm_len) == (16, 4, 3)
    gold = gold_reward_fn(TaskConfig(family="star", alphabet=12))
    assert gold(PROMPT, " a f g") == 1.0


# --------------------------------------------------------------------------- the plan-free demonstrator


def test_star_noiseless_demonstrator_walks_a_uniformly_random_arm():
    rng = random.Random(3)
    n, arm_index, goal_arm = 3000, Counter(), 0
    for _ in range(n):
        xs = STAR.sample_prompt_symbols(rng)
        ys = STAR.demonstrate(xs, 0.0, rng)
        walks = [[xs.centre] + arm for arm in xs.arms()]
        assert ys in walks  # a valid centre-to-leaf path
        assert STAR.walk_score(xs, ys) == 1.0
        arm_index[walks.index(ys)] += 1
        goal_arm += ys == STAR.target(xs)
    for i in range(3):
        assert abs(arm_index[i] / n - 1 / 3) < 0.03
    assert abs(goal_arm / n - 1 / 3) < 0.03  # no plan: the goal's arm only by chance


def test_star_demonstrator_edits_at_the_noise_rate():
    rng = random.Random(4)
    xss = [STAR.sample_prompt_symbols(rng) for _ in range(1000)]
    clean = sum(STAR.demonstrate(xs, 0.3, rng) in [[xs.centre] + a for a in xs.arms()] for xs in xss) / 1000
    assert abs(clean - 0.7 ** 3) < 0.05  # no edit at any of the 3 positions
    noisy = sum(STAR.gold_reward(STAR.prompt(xs), STAR.response(STAR.demonstrate(xs, 0.5, rng))) for xs in xss)
    exact = sum(STAR.gold_reward(STAR.prompt(xs), STAR.response(STAR.demonstrate(xs, 0.0, rng))) for xs in xss)
    assert noisy < exact
    assert abs(exact / 1000 - (1 / 3 * 1 + 2 / 3 * 1 / 3)) < 0.04  # 5/9: the goal arm a third of the time


def test_star_demonstrator_never_reads_the_goal():
    """Why ``star`` has a gap: the demonstrator's output (hence its likelihood log π_demo(y|x)) is the same whichever
    leaf is the goal, while r* is 1 for one arm and ⅓ for the others. The demonstrations carry no plan."""
    rng = random.Random(5)
    for seed in range(200):
        xs = STAR.sample_prompt_symbols(rng)
        leaves = [arm[-1] for arm in xs.arms()]
        outputs = {leaf: STAR.demonstrate(StarGraph(xs.centre, xs.edges, leaf), 0.3, random.Random(seed))
                   for leaf in leaves}
        assert len({tuple(ys) for ys in outputs.values()}) == 1  # identical draws for every goal
        ys = outputs[leaves[0]]
        if ys in [[xs.centre] + arm for arm in xs.arms()]:  # a clean walk: r* 1 for exactly one choice of goal
            golds = sorted(STAR.gold_reward(STAR.prompt(StarGraph(xs.centre, xs.edges, leaf)), STAR.response(ys))
                           for leaf in leaves)
            assert golds == pytest.approx([1 / 3, 1 / 3, 1.0])


# --------------------------------------------------------------------------- generate() for star


@pytest.mark.parametrize("alphabet", [12, 16])
def test_star_generate_holds_out_prompts_at_study_size(alphabet):
    task = StarTask(alphabet=alphabet, degree=3, arm_len=2)
    data = generate(task, seed=0, n_sft=2000, n_pairs=2000, n_val_pairs=400, n_eval_prompts=400, demo_noise=0.3,
                    behaviour_noise=0.5, bt_temperature=0.1, n_sft_val=200)
    assert [len(data[k]) for k in ("sft", "pairs_train", "pairs_val", "eval_prompts", "sft_val")] == [
        2000, 2000, 400, 400, 200]
    train = {r["prompt"] for r in data["sft"]} | {r["prompt"] for r in data["pairs_train"]}
    held = [r["prompt"] for k in ("pairs_val", "eval_prompts", "sft_val") for r in data[k]]
    assert len(set(held)) == len(held) and not train & set(held)
    for r in data["eval_prompts"]:
        assert task.gold_reward(r["prompt"], r["target"]) == 1.0


def test_star_generate_is_deterministic_given_the_seed():
    assert star_data(seed=7) == star_data(seed=7)
    assert star_data(seed=7)["sft"] != star_data(seed=8)["sft"]


def test_star_labels_at_zero_temperature_prefer_higher_gold():
    data = star_data(bt_temperature=0.0, n_pairs=500)
    for r in data["pairs_train"] + data["pairs_val"]:
        assert r["chosen_gold"] >= r["rejected_gold"]
        assert r["chosen_gold"] == STAR.gold_reward(r["prompt"], r["chosen"])
        assert r["rejected_gold"] == STAR.gold_reward(r["prompt"], r["rejected"])
    assert any(r["chosen_gold"] > r["rejected_gold"] for r in data["pairs_train"])


def test_star_behaviour_pairs_that_differ_only_in_the_arm():
    """Why ``star`` belongs to the gap class, on the data: a noticeable fraction of behaviour pairs are two clean
    walks, one down the goal's arm and one down another — equally likely under the demonstrator
    (1/degree · (1 − noise)^(L+1) each) — whose gold rewards differ by ⅔; the labels pick the goal's arm. The
    preference data carries the plan, the demonstrator's likelihood does not."""
    data = star_data(behaviour_noise=0.2, bt_temperature=0.1, n_pairs=1000)
    rows = data["pairs_train"]
    arm_only = []
    for r in rows:
        xs = STAR.parse_prompt(r["prompt"])
        walks = [STAR.response([xs.centre] + arm) for arm in xs.arms()]
        if r["chosen"] in walks and r["rejected"] in walks and r["chosen"] != r["rejected"]:
            arm_only.append(r)
            # two clean walks: the same demonstrator likelihood; r* is 1 for the goal's arm and ⅓ for any other
            assert {r["chosen_gold"], r["rejected_gold"]} <= {1.0, 1 / 3}
    differ = [r for r in arm_only if r["chosen_gold"] != r["rejected_gold"]]
    # both clean: (0.8^3)^2 ≈ 0.27; different arms, one of them the goal's: 4/9 of those ≈ 0.12
    assert len(differ) / len(rows) > 0.08
    right = sum(r["chosen_gold"] == 1.0 for r in differ) / len(differ)
    assert right > 0.95  # σ(⅔ / 0.1) ≈ 0.999
    # while the SFT demonstrations pick the goal's arm no more often than chance allows at their noise level
    sft = data["sft"]
    assert sum(STAR.picks_goal_arm(r["prompt"], r["completion"]) for r in sft) / len(sft) < 0.4

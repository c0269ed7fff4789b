"""The English task families (roads.data.text): hand-checked gold rewards (ROUGE-L over words, the four constraints),
why each family belongs to its class, determinism from a seed, the families through prepare_data and through SFT and
evaluate on a tiny config-built model, and ``smollm2-135m`` as ``model.pretrained`` (resolved to the fetched folder,
or one line saying to fetch it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from roads.artifacts import read_json, read_jsonl
from roads.config import StageSpec
from roads.data.family import check_family
from roads.data.synthetic import generate
from roads.data.text import ADJECTIVES, NOUNS, VERBS, TextTask, rouge_l_f1, sentence, words_of
from roads.errors import ConfigError, DataError, RoadsError
from roads.fetch import fetched_path, model_cache, resolve_pretrained
from roads.runner import execute
from roads.settings import EvaluateConfig, ModelConfig, PrepareDataConfig, SftConfig, TaskConfig

CONSTRAINTS = TextTask("constraints")
ROUGE = TextTask("rouge")
SMOLLM2 = fetched_path("smollm2-135m")
NO_SMOLLM2 = f"SmolLM2-135M not fetched into {model_cache()}: run `roads model fetch smollm2-135m` (make model)"


def data(task, seed: int = 0, **kw) -> dict[str, list[dict]]:
    args = dict(n_sft=60, n_pairs=60, n_val_pairs=20, n_eval_prompts=20, demo_noise=0.3, behaviour_noise=0.5,
                bt_temperature=0.1, n_sft_val=10, n_select_pairs=10)
    args.update(kw)
    return generate(task, seed=seed, **args)


# --------------------------------------------------------------------------- ROUGE-L by hand


@pytest.mark.parametrize(
    "reference, response, expected",
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        # LCS "the cat the mat" = 4; P = 4/4, R = 4/6 -> F1 = 2·1·⅔/(1+⅔) = 0.8
        ("the cat sat on the mat", "the cat the mat", 0.8),
        # LCS of "a b c d" and "d c b a" is 1 word: P = R = ¼ -> F1 = ¼
        ("a b c d", "d c b a", 0.25),
        # "police killed the gunman" / "the gunman police killed": LCS "police killed" = 2: P = R = ½ -> ½
        ("police killed the gunman", "the gunman police killed", 0.5),
        # LCS "quick fox" = 2; P = 2/3, R = 2/4 -> F1 = 2·(⅔·½)/(⅔+½) = (2/3)/(7/6) = 4/7
        ("the quick brown fox", "quick red fox", 4 / 7),
        # case and trailing punctuation do not count: "Calm boat!" is "calm boat"
        ("calm boat finds hill.", "Calm boat!", 2 * 1 * 0.5 / 1.5),
        ("calm boat", "", 0.0),
        ("", "calm boat", 0.0),
        ("calm boat", "river hill", 0.0),
    ],
)
def test_rouge_l_f1_by_hand(reference, response, expected):
    assert rouge_l_f1(reference, response) == pytest.approx(expected, abs=1e-12)


def test_words_of_strips_case_and_punctuation():
    assert words_of(" The dog, sees a CAT!") == ["the", "dog", "sees", "a", "cat"]
    assert words_of(" ! ?") == []


# --------------------------------------------------------------------------- the constraints family by hand

PROMPT = 'Write exactly 5 words, using "river" but not "quiet", ending with "!".\n'


@pytest.mark.parametrize(
    "response, met",
    [
        (" the river sees a dog!", (True, True, True, True)),          # 5 words, river, no quiet, "!"
        (" the river sees a dog.", (True, True, True, False)),         # wrong end mark
        (" the quiet river sees dog!", (True, True, False, True)),     # uses the avoided word
        (" the river sees a small dog!", (False, True, True, True)),   # 6 words
        (" the stream sees a dog!", (True, False, True, True)),        # no "river" ("stream" is not it)
        (" the rivers see a dog!", (True, False, True, True)),         # "rivers" is not the word "river"
        (" River sees the quiet dog !", (True, True, False, True)),    # a bare "!" is no word; case is ignored
        ("", (False, False, True, False)),                              # empty: only "avoids quiet" holds
        (" quiet quiet quiet quiet quiet?", (True, False, False, False)),
    ],
)
def test_constraints_gold_reward_by_hand(response, met):
    assert CONSTRAINTS.constraints_met(PROMPT, response) == met
    assert CONSTRAINTS.gold_reward(PROMPT, response) == sum(met) / 4


def test_constraints_prompt_round_trips_and_rejects_others():
    assert CONSTRAINTS.parse_prompt(PROMPT) == (5, "river", "quiet", "!")
    assert CONSTRAINTS.prompt((5, "river", "quiet", "!")) == PROMPT
    with pytest.raises(DataError, match="constraints"):
        CONSTRAINTS.parse_prompt("Rewrite in house style: the dog sees a cat.\n")
    with pytest.raises(DataError, match="rouge"):
        ROUGE.parse_prompt(PROMPT)


# --------------------------------------------------------------------------- the rouge family by hand


def test_rouge_gold_reward_by_hand():
    table = ROUGE.house_table()
    for words in (ADJECTIVES, NOUNS, VERBS):  # a permutation within each word list that renames half of it
        assert sorted(table[w] for w in words) == sorted(words)
        assert sum(table[w] != w for w in words) == len(words) - len(words) // 2
    xs = ("the", "quiet", "river", "sees", "a", "small", "stone.")
    prompt = ROUGE.prompt(xs)
    assert prompt == "Rewrite in house style: the quiet river sees a small stone.\n"
    z = [table[w] for w in ("quiet", "river", "sees", "small", "stone")]  # articles dropped, 5 content words
    assert ROUGE.target(xs) == z[:-1] + [z[-1] + "."]
    r = lambda text: ROUGE.gold_reward(prompt, text)  # noqa: E731
    assert r(" " + " ".join(z) + ".") == 1.0
    assert r(" " + " ".join(z)) == 1.0  # the end mark is not a word
    # first two house words: LCS 2, P = 2/2, R = 2/5 -> F1 = 2·0.4/1.4 = 4/7
    assert r(" " + " ".join(z[:2])) == pytest.approx(4 / 7)
    # the reference reversed (5 words, all distinct unless the table repeats one): LCS 1 -> P = R = 1/5
    if len(set(z)) == 5:
        assert r(" " + " ".join(z[::-1])) == pytest.approx(0.2)
    assert r("") == 0.0


def test_targets_score_one_and_rewards_stay_in_range():
    rng = random.Random(0)
    for task in (CONSTRAINTS, ROUGE, TextTask("constraints", min_len=3, max_len=12)):
        for _ in range(300):
            xs = task.sample_prompt_symbols(rng)
            prompt = task.prompt(xs)
            assert task.parse_prompt(prompt) == xs
            assert task.gold_reward(prompt, task.response(task.target(xs))) == 1.0
            for noise in (0.0, 0.3, 0.7, 1.0):
                r = task.gold_reward(prompt, task.response(task.demonstrate(xs, noise, rng)))
                assert 0.0 <= r <= 1.0


def test_sentence_has_exactly_n_words_and_the_word_asked_for():
    rng = random.Random(3)
    for n in range(3, 15):
        for use in ("river", "quiet", None):
            ys = sentence(n, rng, use=use)
            assert len(ys) == n and (use is None or use in ys)


def test_settings_check_lengths():
    from roads.data.family import build

    assert build(TaskConfig(family="rouge", min_len=3, max_len=5)) == TextTask("rouge", min_len=3, max_len=5)
    with pytest.raises(ValueError, match="min_len"):  # a sentence needs a noun, a verb and a noun
        build(TaskConfig(family="constraints", min_len=2))
    with pytest.raises(DataError, match="min_len"):
        TextTask("rouge", min_len=6, max_len=5)


# --------------------------------------------------------------------------- why each family belongs to its class


def test_constraints_class_the_demonstrator_ignores_the_count_and_the_avoided_word():
    """The gap: r* depends on N and V, the demonstrator's output does not — draw for draw it writes the same sentence
    whatever N and V the prompt names, so log π_demo cannot express those terms of r*; the verifier is four local
    checks of the response's words."""
    rng = random.Random(0)
    assert CONSTRAINTS.gap_class == "gap"
    differs = 0
    for i in range(300):
        _, use, _, mark = CONSTRAINTS.sample_prompt_symbols(rng)
        a, b = (4, use, "quiet", mark), (8, use, "dog" if use != "dog" else "cat", mark)
        ya = CONSTRAINTS.demonstrate(a, 0.3, random.Random(i))
        yb = CONSTRAINTS.demonstrate(b, 0.3, random.Random(i))
        assert ya == yb  # the same draws, the same sentence: N and V never enter the demonstrator
        text = CONSTRAINTS.response(ya)
        r_a, r_b = (CONSTRAINTS.gold_reward(CONSTRAINTS.prompt(xs), text) for xs in (a, b))
        differs += r_a != r_b
    assert differs > 100  # while r* of that one sentence often differs between the two prompts
    # its lengths are uniform over [min_len, max_len] whatever N asks for: right by chance about 1 time in 5
    rows = data(CONSTRAINTS, n_sft=500)["sft"]
    right = sum(CONSTRAINTS.constraints_met(r["prompt"], r["completion"])[0] for r in rows) / len(rows)
    assert 0.1 < right < 0.35
    # the pairs carry the count: the chosen response has the right count more often than the rejected one
    pairs = data(CONSTRAINTS, n_pairs=500)["pairs_train"]
    count = lambda r, k: CONSTRAINTS.constraints_met(r["prompt"], r[k])[0]  # noqa: E731
    assert sum(count(r, "chosen") for r in pairs) > 1.5 * sum(count(r, "rejected") for r in pairs)


def test_rouge_class_the_verifier_needs_the_hidden_table():
    """Closed from the verification side: r* changes when only the secret changes (a verifier must know the house
    table), the prompt does not contain the reference, and generating needs the same table (the target changes too)."""
    rng = random.Random(1)
    other = TextTask("rouge", secret=ROUGE.secret + 1)
    assert ROUGE.gap_class == "closed (verification)"
    assert other.house_table() != ROUGE.house_table()
    changed, in_prompt, total = 0, 0, 0
    for _ in range(200):
        xs = ROUGE.sample_prompt_symbols(rng)
        p, y = ROUGE.prompt(xs), ROUGE.response(ROUGE.target(xs))
        changed += ROUGE.gold_reward(p, y) != other.gold_reward(p, y)
        assert ROUGE.target(xs) != other.target(xs) or ROUGE.gold_reward(p, y) == other.gold_reward(p, y)
        ref = words_of(y)
        in_prompt += sum(w in words_of(" ".join(xs)) for w in ref)
        total += len(ref)
    assert changed > 150
    # about half the reference words are not the prompt's (nor, mostly, in it): only the table gives them
    assert 0.25 < 1 - in_prompt / total < 0.75


def test_the_report_reads_each_family_s_class():
    from roads.validity import gap_class

    assert gap_class("constraints") == CONSTRAINTS.gap_class == "gap"
    assert gap_class("rouge") == ROUGE.gap_class == "closed (verification)"


# --------------------------------------------------------------------------- determinism and the data


@pytest.mark.parametrize("task", [CONSTRAINTS, ROUGE], ids=["constraints", "rouge"])
def test_generate_is_deterministic_from_the_seed(task):
    assert data(task, seed=5) == data(task, seed=5)
    assert data(task, seed=5) != data(task, seed=6)
    splits = data(task)
    held = {r["prompt"] for r in splits["eval_prompts"]} | {r["prompt"] for r in splits["pairs_val"]}
    assert not held & {r["prompt"] for r in splits["sft"] + splits["pairs_train"]}


@pytest.mark.parametrize("family", ["constraints", "rouge"])
def test_the_families_through_prepare_data(family, tmp_path):
    cfg = PrepareDataConfig(n_sft=40, n_pairs=30, n_val_pairs=10, n_eval_prompts=8, n_sft_val=6, n_select_pairs=6)
    task = TaskConfig(family=family)
    result = execute(StageSpec(stage="prepare_data", params=cfg.model_dump(), seed=0, task=task), {}, tmp_path)
    out = Path(result.artifact.path)
    assert read_json(out / "task.json")["family"] == family
    assert len(read_jsonl(out / "sft.jsonl")) == 40 and len(read_jsonl(out / "eval_prompts.jsonl")) == 8
    family_obj = TextTask(family)
    for row in read_jsonl(out / "pairs_train.jsonl"):
        assert row["chosen_gold"] == family_obj.gold_reward(row["prompt"], row["chosen"])
    assert 0.0 < result.metrics["prepare_data/sft_gold_mean"] < 1.0
    assert read_json(out / "ceiling.json")["n_pairs"] == 10
    check_family(family, task)  # the preflight's check of a family


@pytest.mark.skipif(SMOLLM2 is None, reason=NO_SMOLLM2)
@pytest.mark.parametrize("family", ["constraints", "rouge"])
def test_smollm2_tokenizer_round_trips_the_families(family):
    from roads.models import load_tokenizer

    check_family(family, TaskConfig(family=family), tokenizer=load_tokenizer(str(SMOLLM2)))


# --------------------------------------------------------------------------- SFT and evaluate on a tiny model


def test_text_family_through_sft_and_evaluate_on_a_tiny_model(tmp_path):
    cfg = PrepareDataConfig(n_sft=64, n_pairs=8, n_val_pairs=8, n_eval_prompts=6, n_sft_val=8, n_select_pairs=0)
    task = TaskConfig(family="constraints")
    data_ref = execute(StageSpec(stage="prepare_data", params=cfg.model_dump(), seed=0, task=task), {},
                       tmp_path).artifact
    sft_cfg = SftConfig(epochs=1, batch_size=16, max_length=160)
    sft = execute(StageSpec(stage="sft", params=sft_cfg.model_dump(), seed=0, model=ModelConfig(vocab_size=512)),
                  {"data": data_ref}, tmp_path)
    assert sft.metrics["sft/suppressed_mass"] > 0  # the vocabulary is restricted to lowercase words and .!?
    ev_cfg = EvaluateConfig(samples_per_prompt=2, max_new_tokens=12)
    ev = execute(StageSpec(stage="evaluate", params=ev_cfg.model_dump(), seed=0, policy="sft"),
                 {"data": data_ref, "reference": sft.artifact, "policy": sft.artifact}, tmp_path)
    samples = read_jsonl(Path(ev.artifact.path) / "samples.jsonl")
    assert len(samples) == 12
    allowed = set(TextTask.response_symbols) | {" "}
    for row in samples:  # every sample is scored by the exact reward, and is written in the task's symbols
        assert row["gold_reward"] == CONSTRAINTS.gold_reward(row["prompt"], row["completion"])
        assert set(row["completion"]) <= allowed
    assert ev.metrics["evaluate/gold_reward_mean"] == pytest.approx(sum(r["gold_reward"] for r in samples) / 12,
                                                                    abs=1e-6)
    assert ev.metrics["evaluate/kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # SFT against itself


# --------------------------------------------------------------------------- smollm2-135m as model.pretrained


def test_a_model_name_not_fetched_fails_in_the_preflight_with_the_fetch_command(tmp_path, monkeypatch):
    from flows.preflight import check_model

    monkeypatch.setenv("ROADS_MODEL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError) as err:
        check_model("smollm2-135m")
    assert "roads model fetch smollm2-135m" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RoadsError, match="roads model fetch smollm2-135m"):
        resolve_pretrained("smollm2-135m")
    assert resolve_pretrained("smollm2-135m", must_exist=False) == "smollm2-135m"
    assert resolve_pretrained("some/folder") == "some/folder"  # anything else is left as given


@pytest.mark.skipif(SMOLLM2 is None, reason=NO_SMOLLM2)
def test_the_model_name_resolves_to_the_fetched_folder():
    from flows.preflight import check_model

    assert resolve_pretrained("smollm2-135m") == str(SMOLLM2)
    check_model("smollm2-135m")


@pytest.mark.skipif(SMOLLM2 is None, reason=NO_SMOLLM2)
def test_smollm2_by_name_with_lora_through_sft_and_evaluate(tmp_path):
    """The real pipeline's model, by its short name, on a handful of examples: LoRA SFT, then evaluate scores its
    English samples with the exact reward, and the policy writes only lowercase words and .!? (response_vocab task)."""
    from roads.lora import ADAPTER_DIR
    from roads.settings import LoraConfig

    cfg = PrepareDataConfig(n_sft=8, n_pairs=4, n_val_pairs=4, n_eval_prompts=2, n_sft_val=4, n_select_pairs=0)
    task = TaskConfig(family="rouge")
    data_ref = execute(StageSpec(stage="prepare_data", params=cfg.model_dump(), seed=0, task=task), {},
                       tmp_path).artifact
    model = ModelConfig(pretrained="smollm2-135m", lora=LoraConfig(rank=4, alpha=8.0))
    sft = execute(StageSpec(stage="sft", params=SftConfig(epochs=1, batch_size=8, lr=5e-4, max_length=64).model_dump(),
                            seed=0, model=model, lora=model.lora), {"data": data_ref}, tmp_path)
    assert (Path(sft.artifact.path) / ADAPTER_DIR).is_dir() and sft.metrics["sft/parameters"] > 1e8
    ev_cfg = EvaluateConfig(samples_per_prompt=2, max_new_tokens=12)
    ev = execute(StageSpec(stage="evaluate", params=ev_cfg.model_dump(), seed=0, policy="sft"),
                 {"data": data_ref, "reference": sft.artifact, "policy": sft.artifact}, tmp_path)
    samples = read_jsonl(Path(ev.artifact.path) / "samples.jsonl")
    assert len(samples) == 4
    for row in samples:
        assert row["gold_reward"] == ROUGE.gold_reward(row["prompt"], row["completion"])
        assert set(row["completion"]) <= set(TextTask.response_symbols) | {" "}

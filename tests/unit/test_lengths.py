"""No silent drops: every TRL-backed stage counts the examples it trained on, truncated and dropped for length
(``too_long``), and fails when it drops more than ``max_dropped_fraction``. The default rule is TRL's own handling,
so results at the defaults are those from before the rule (same weights, bit for bit)."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from datasets import Dataset

from roads.errors import DataError
from roads.settings import OfflineDpoConfig, RewardModelConfig, SftConfig
from support import Recorder, weights


@pytest.fixture(scope="module")
def rows():
    from roads.data.synthetic import SyntheticTask, generate
    from roads.models import build_tokenizer

    data = generate(SyntheticTask("gap"), seed=0, n_sft=32, n_pairs=16, n_val_pairs=1, n_eval_prompts=1,
                    demo_noise=0.3, behaviour_noise=0.5, bt_temperature=0.1)
    corpus = ([r["prompt"] + r["completion"] for r in data["sft"]]
              + [r["prompt"] + r["chosen"] + r["rejected"] for r in data["pairs_train"]])
    return data["sft"], data["pairs_train"], build_tokenizer(corpus)


@pytest.fixture(scope="module")
def start(rows, tmp_path_factory):
    from roads.models import new_causal_lm

    path = tmp_path_factory.mktemp("start")
    new_causal_lm("tiny", rows[2], seed=0).save_pretrained(path)
    rows[2].save_pretrained(path)
    return path


def _lengths(tokenizer, pairs):
    """Tokens of prompt + each response + EOS, as TRL counts them."""
    def n(p, y):
        return len(tokenizer(p + y + tokenizer.eos_token)["input_ids"])
    return [max(n(r["prompt"], r["chosen"]), n(r["prompt"], r["rejected"])) for r in pairs]


def _cut(pairs, tokenizer):
    """A max_length that about half the pairs exceed."""
    return sorted(_lengths(tokenizer, pairs))[len(pairs) // 2]


def test_the_reward_model_records_the_pairs_it_dropped(rows, start, tmp_path):
    from roads.stages.reward_model import _train
    from roads.training import save_trained

    _, pairs, tokenizer = rows
    cut = _cut(pairs, tokenizer)
    expected = sum(n > cut for n in _lengths(tokenizer, pairs))
    assert 0 < expected <= len(pairs) // 2
    tracker = Recorder()
    cfg = RewardModelConfig(epochs=1, batch_size=8, max_length=cut)
    model, tok, trainer = _train(cfg, 0, str(start), pairs, tracker)
    metrics = save_trained("reward_model", model, tok, trainer, tmp_path)
    assert metrics["reward_model/examples"] == len(pairs)
    assert metrics["reward_model/dropped_too_long"] == expected
    assert metrics["reward_model/examples_trained"] == len(pairs) - expected
    assert any("dropped" in m for m in tracker.messages)
    trained = json.loads((tmp_path / "trained.json").read_text())
    assert trained["lengths"]["dropped_too_long"] == expected and trained["train_examples"] == len(pairs) - expected


def test_dropping_more_than_the_set_fraction_fails_naming_the_setting(rows, start):
    from roads.stages.reward_model import _train
    from roads.training import NullTracker

    _, pairs, tokenizer = rows
    cfg = RewardModelConfig(epochs=1, batch_size=8, max_length=_cut(pairs, tokenizer), max_dropped_fraction=0.1)
    with pytest.raises(DataError, match=r"^reward_model: \d+ of 16 training examples .* more than "
                                        r"reward_model\.max_dropped_fraction = 0\.1; raise reward_model\.max_length"):
        _train(cfg, 0, str(start), pairs, NullTracker())


def test_dpo_truncates_by_default_and_drops_when_told(rows, start, tmp_path):
    from roads.dpo_trainer import train_dpo
    from roads.training import NullTracker

    _, pairs, tokenizer = rows
    cut = _cut(pairs, tokenizer)
    long = sum(n > cut for n in _lengths(tokenizer, pairs))
    kw = dict(beta=0.1, loss_type="sigmoid", precompute_ref=True)
    cut_metrics = train_dpo("offline_dpo", OfflineDpoConfig(epochs=1, batch_size=8, max_length=cut), 0, str(start),
                            pairs, tmp_path / "cut", NullTracker(), **kw)
    assert cut_metrics["offline_dpo/truncated"] == long and cut_metrics["offline_dpo/examples_trained"] == len(pairs)
    dropped = train_dpo("offline_dpo", OfflineDpoConfig(epochs=1, batch_size=8, max_length=cut, too_long="drop"), 0,
                        str(start), pairs, tmp_path / "drop", NullTracker(), **kw)
    assert dropped["offline_dpo/dropped_too_long"] == long
    assert dropped["offline_dpo/examples_trained"] == len(pairs) - long


def test_sft_counts_truncated_and_prompt_filled_rows(rows, tmp_path):
    from roads.models import new_causal_lm
    from roads.sft_trainer import train_sft
    from roads.training import NullTracker

    sft, _, tokenizer = rows
    prompts = sorted(len(tokenizer(r["prompt"])["input_ids"]) for r in sft)
    cut = next(n for n in prompts if n > prompts[0])  # the shortest prompts fit, some fill max_length
    filled = sum(n >= cut for n in prompts)
    assert 0 < filled < len(sft)
    metrics = train_sft("sft", SftConfig(epochs=1, batch_size=8, select="last", max_length=cut,
                                         max_dropped_fraction=1.0), 0,
                        new_causal_lm("tiny", tokenizer, seed=0), tokenizer, sft, tmp_path, NullTracker())
    assert metrics["sft/examples"] == len(sft)
    assert metrics["sft/dropped_prompt_too_long"] == filled  # nothing of their response is left to learn
    assert metrics["sft/truncated"] == len(sft) - filled  # every response is cut at this length
    assert metrics["sft/examples_trained"] == len(sft) - filled


def test_the_default_rule_gives_trl_s_own_weights(rows, start):
    """SFT (truncate) and the reward model (drop) at their defaults train exactly what TRL alone trained."""
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from roads.models import new_causal_lm, reward_model_from_policy
    from roads.sft_trainer import train_sft
    from roads.stages.reward_model import _train
    from roads.training import NullTracker, train, trainer_args

    sft, pairs, tokenizer = rows
    cfg = SftConfig(epochs=1, batch_size=8, select="last", max_length=_cut(pairs, tokenizer))
    with tempfile.TemporaryDirectory() as scratch:
        ours = new_causal_lm("tiny", tokenizer, seed=0)
        train_sft("sft", cfg, 0, ours, tokenizer, sft, scratch, NullTracker())
        theirs = new_causal_lm("tiny", tokenizer, seed=0)
        train(SFTTrainer(model=theirs, args=SFTConfig(**trainer_args(cfg, 0, scratch)), processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                          for r in sft])))
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
        rm_cfg = RewardModelConfig(epochs=1, batch_size=8, max_length=_cut(pairs, tokenizer))
        ours = _train(rm_cfg, 0, str(start), pairs, NullTracker())[0]
        theirs, tok = reward_model_from_policy(str(start), seed=0)
        train(RewardTrainer(model=theirs, args=RewardConfig(**trainer_args(rm_cfg, 0, scratch)), processing_class=tok,
                            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                             for r in pairs])))
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name

"""Every numeric setting bounded where it must be (issue 15): finite floats, integers that are integers, no bool taken
for a number, positive where zero or less cannot work, seeds that numpy accepts and are each given once, a
``max_length`` the task's prompts fit in, and ``--workers`` of at least 1. Each mistake is a ConfigError (exit 2)
on one line that names the key, raised when the study loads, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from roads.config import _parse_value, load_study, task_lengths
from roads.errors import ConfigError
from roads.settings import TaskConfig

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"


def refused(pipeline: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_study(PIPELINES, pipeline, list(overrides))
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in message, f"message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- one field at a time


@pytest.mark.parametrize("override, key, why", [
    # not finite
    ("sft.epochs=.inf", "sft.epochs", "finite"),
    ("sft.lr=.inf", "sft.lr", "finite"),
    ("sft.lr=.nan", "sft.lr", "finite"),
    ("offline_dpo.beta=.inf", "offline_dpo.beta", "finite"),
    ("online_dpo.temperature=.inf", "online_dpo.temperature", "finite"),
    ("report.validity.min_control_effect=-.inf", "report.validity.min_control_effect", "finite"),
    ("reward_model.lrs=[1.0e-3, .inf]", "reward_model.lrs.1", "finite"),
    ("select_dpo.betas=[.nan]", "select_dpo.betas.0", "finite"),
    ("prepare_data.bt_temperature=.inf", "prepare_data.bt_temperature", "finite"),
    # a bool is not a number, a float is not an integer
    ("sft.epochs=true", "sft.epochs", "valid number"),
    ("sft.lr=false", "sft.lr", "valid number"),
    ("sft.batch_size=true", "sft.batch_size", "valid integer"),
    ("sft.batch_size=32.0", "sft.batch_size", "valid integer"),
    ("sft.batch_size=2.5", "sft.batch_size", "valid integer"),
    ("online_dpo.k=true", "online_dpo.k", "valid integer"),
    ("prepare_data.n_sft=1.0e3", "prepare_data.n_sft", "valid integer"),
    ("tasks.gap.alphabet=true", "tasks.gap.alphabet", "valid integer"),
    ("seed=true", "seed", "valid integer"),
    ("offline_dpo.precompute_ref=1", "offline_dpo.precompute_ref", "valid boolean"),
    # positive where zero or less cannot work
    ("sft.logging_steps=0", "sft.logging_steps", "greater than 0"),
    ("offline_dpo.logging_steps=-1", "offline_dpo.logging_steps", "greater than 0"),
    ("evaluate.batch_size=0", "evaluate.batch_size", "greater than 0"),
    ("measure_gap.batch_size=0", "measure_gap.batch_size", "greater than 0"),
    ("online_dpo.generation_batch_size=0", "online_dpo.generation_batch_size", "greater than 0"),
    ("reward_model.val_batch_size=0", "reward_model.val_batch_size", "greater than 0"),
    ("reward_model.lrs=[1.0e-3, 0]", "reward_model.lrs.1", "greater than 0"),
    ("select_dpo.lrs=[-1.0e-4]", "select_dpo.lrs.0", "greater than 0"),
    ("select_dpo.betas=[0]", "select_dpo.betas.0", "greater than 0"),
    ("online_rl.vllm_gpu_memory_utilization=0", "online_rl.vllm_gpu_memory_utilization", "greater than 0"),
    ("online_dpo.vllm_gpu_memory_utilization=1.5", "online_dpo.vllm_gpu_memory_utilization", "less than or equal"),
    ("evaluate.table_rows=-1", "evaluate.table_rows", "greater than or equal to 0"),
    ("sft.divergence_factor=1", "sft.divergence_factor", "greater than 1"),
    ("sft.divergence_factor=.inf", "sft.divergence_factor", "finite"),
    ("report.validity.max_likelihood_spearman=2", "report.validity.max_likelihood_spearman", "less than or equal"),
    # seeds numpy (and so the Trainer) accepts
    ("seed=-1", "seed", "greater than or equal to 0"),
    ("seed=4294967296", "seed", "less than"),
    ("pipeline.seeds=[0, -3]", "pipelines.smoke.seeds.1", "greater than or equal to 0"),
    ("report.bootstrap_seed=-1", "report.bootstrap_seed", "greater than or equal to 0"),
])
def test_a_bad_value_is_refused_naming_its_key(override, key, why):
    message = refused("smoke", override)
    assert message.startswith(f"--set {override}: ")
    assert key in message and why in message


def test_duplicate_seeds_are_refused_naming_pipeline_seeds():
    message = refused("smoke", "pipeline.seeds=[0,0]")
    assert message == "--set pipeline.seeds=[0,0]: pipelines.smoke.seeds: seed 0 is repeated; give each seed once"
    assert "seed 1, 2 is repeated" in refused("smoke", "pipeline.seeds=[1, 2, 1, 2, 3]")


def test_duplicate_seeds_in_the_file_are_refused_naming_the_file(tmp_path):
    import yaml

    path = tmp_path / "study.yaml"
    doc = yaml.safe_load(PIPELINES.read_text())
    doc["pipelines"]["smoke"]["seeds"] = [3, 3]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=r"study\.yaml: pipelines\.smoke\.seeds: seed 3 is repeated"):
        load_study(path, "smoke")


@pytest.mark.parametrize("override", ["sft.epochs=2", "sft.epochs=2.5", "sft.lr=1e-3", "sft.lr=1e3", "sft.lr=5.0e-4",
                                      "seed=4294967295", "pipeline.seeds=[0, 1]", "sft.divergence_factor=1.0e6",
                                      "reward_model.lrs=[1e-4, 3e-4]", "sft.batch_size=8"])
def test_good_values_still_load(override, monkeypatch):
    monkeypatch.chdir(ROOT)
    load_study(PIPELINES, "smoke", [override])


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; strict float settings would refuse it, so the study's YAML reads it as 1.2 does
    assert _parse_value("1e-3") == 0.001 and _parse_value("1e3") == 1000.0 and _parse_value("-2E+2") == -200.0
    assert _parse_value("[1e-4, 2]") == [0.0001, 2]
    assert _parse_value("e3") == "e3" and _parse_value("1e") == "1e" and _parse_value("abc") == "abc"
    assert load_study(PIPELINES, "smoke", ["sft.lr=2e-3"]).defaults.sft.lr == 0.002


def test_an_integer_is_taken_for_a_float_unchanged():
    study = load_study(PIPELINES, "smoke", ["sft.epochs=4", "sft.lr=1"])
    assert study.defaults.sft.epochs == 4.0 and isinstance(study.defaults.sft.epochs, float)
    assert study.defaults.sft.lr == 1.0


# --------------------------------------------------------------------------- combinations


def test_task_lengths_are_lower_bounds_of_the_presets_tokenizer():
    """The counts are GPT-2 pre-tokenizer words; the presets' BPE (trained on the task text) never merges across
    them, so a real tokenizer gives at least as many tokens (here: exactly as many)."""
    from roads.models import build_tokenizer

    task = TaskConfig(family="gap", alphabet=8, min_len=4, max_len=8)
    shortest, longest, answer = task_lengths(task)
    assert (shortest, longest, answer) == (7, 11, 20)  # "sort: a b c d ->"; 8 symbols + 3; + 8 symbols + EOS
    tokenizer = build_tokenizer(["sort: a b c d e f g h -> a b c d e f g h", "sort: h g f e -> e f g h"] * 50)
    assert len(tokenizer("sort: a b c d e f g h ->")["input_ids"]) >= longest
    assert len(tokenizer("sort: a b c d ->")["input_ids"]) >= shortest
    assert task_lengths(TaskConfig(family="short"))[2] == 12 + 2 + 1  # "min2" is two words; a 2-symbol answer
    assert task_lengths(TaskConfig(family="preferences", source="x.jsonl")) is None  # real data: the data's lengths


@pytest.mark.parametrize("overrides, key", [
    (["sft.max_length=12"], "sft.max_length 12"),
    (["reward_model.max_length=19"], "reward_model.max_length 19"),
    (["offline_dpo.max_length=10"], "offline_dpo.max_length 10"),
    (["tasks.gap.max_len=31"], "sft.max_length 64"),  # 34-token prompts, 66 with the answer: past the default
])
def test_a_max_length_shorter_than_the_prompts_need_is_refused(overrides, key):
    message = refused("smoke", *overrides)
    assert key in message and "'gap'" in message and "raise max_length" in message
    assert message.startswith(f"{PIPELINES} (after overrides): pipelines.smoke: ")


def test_the_length_check_sees_every_override_first():
    # raising max_len and max_length together passes: the check runs once all overrides are in
    load_study(PIPELINES, "smoke", ["tasks.gap.max_len=31", "sft.max_length=80", "reward_model.max_length=80",
                                    "offline_dpo.max_length=80"])
    load_study(PIPELINES, "smoke", ["sft.max_length=20"])  # exactly the longest answer with EOS


def test_a_variant_max_length_is_named_by_its_variant():
    message = refused("default", "variants.offline_dpo_2x.set={max_length: 10}")
    assert "variants.offline_dpo_2x (offline_dpo) max_length 10" in message


def test_online_rl_needs_room_for_a_prompt_beside_its_new_tokens():
    message = refused("default", "online_rl.max_length=20", "online_rl.max_new_tokens=16")
    assert "online_rl.max_length 20 leaves 4 tokens beside max_new_tokens 16" in message and "(7)" in message
    load_study(PIPELINES, "default", ["online_rl.max_length=24", "online_rl.max_new_tokens=16"])  # short: 8


def test_lengths_are_not_guessed_for_a_pretrained_tokenizer_or_real_data(monkeypatch, hh_file):
    monkeypatch.chdir(ROOT)
    load_study(PIPELINES, "smoke", ["model.pretrained=some/model", "sft.max_length=10"])  # its tokenizer decides
    load_study(PIPELINES, "hh-rlhf-smoke", ["sft.max_length=8"])  # the data decides: checked when it is read


def test_a_star_task_too_big_for_its_alphabet_is_refused_at_load():
    message = refused("smoke", "tasks.gap.family=star", "tasks.gap.degree=5")
    assert "tasks.gap: star: alphabet 8 cannot name the 11 nodes" in message


# --------------------------------------------------------------------------- the CLI's --workers


@pytest.mark.parametrize("argv", [["run", "smoke"], ["stage", "sft"], ["report"], ["sweep", "sweep-smoke"]])
@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_workers_below_one_are_refused_by_the_cli(argv, value, capsys, monkeypatch, tmp_path):
    from flows.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("ROADS_HOME", str(home))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        main([*argv, "--workers", value])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "argument --workers: expected a whole number of at least 1" in errors[0]
    assert not home.exists()


def test_workers_of_one_or_more_are_taken():
    from flows.cli import build_parser

    assert build_parser().parse_args(["run", "smoke", "--workers", "3"]).workers == 3
    assert build_parser().parse_args(["run", "smoke"]).workers is None

"""Tests for roads.config (load, validate, override, freeze, fingerprint) and the CLI's config-facing commands."""

from __future__ import annotations

import copy
from pathlib import Path

import pydantic
import pytest
import yaml

from roads.config import load_study, load_study_file, parse_override
from roads.stage_table import STAGE_NAMES
from roads.errors import ConfigError
from roads.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"
PIPELINE_NAMES = list(load_study_file(PIPELINES).pipelines)
RAW = yaml.safe_load(PIPELINES.read_text())


def write_study(tmp_path: Path, mutate=None, name: str = "study.yaml") -> Path:
    raw = copy.deepcopy(RAW)
    if mutate:
        mutate(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def config_error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_study(*args, **kwargs)
    err = info.value
    assert err.exit_code == 2
    assert "\n" not in str(err), f"message is not one line: {err!r}"
    return err


# --------------------------------------------------------------------------- every pipeline loads and plans


def test_pipelines_file_has_the_expected_pipelines():
    assert {"default", "smoke"} <= set(PIPELINE_NAMES)


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_every_pipeline_loads_and_plans(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative data paths start from the project folder, as with `make run`
    raw_sources = [RAW["tasks"][t].get("source") for t in RAW["pipelines"][name]["tasks"]]
    missing = [s for s in raw_sources if s and not (ROOT / s).exists()]
    if missing:
        pytest.skip(f"data file not present on this machine: {missing[0]}")
    study = load_study(PIPELINES, name)
    assert study.pipeline == name
    nodes = build_plan(study)
    assert nodes
    seen: set[str] = set()
    for node in nodes:
        assert node.id not in seen, f"duplicate node {node.id}"
        for dep in node.inputs.values():
            assert dep in seen, f"{node.id} needs {dep}, which is not an earlier node"
        seen.add(node.id)
    assert {n.name for n in nodes} == set(study.spec.stages)  # every listed stage or policy is a node
    assert len({n.spec.fingerprint() for n in nodes}) >= 1


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_defaults(tmp_path):
    path = write_study(tmp_path, lambda r: r["defaults"]["sft"].__setitem__("epoch", 2))
    err = config_error(path, "smoke")
    assert str(path) in str(err)
    assert "defaults.sft.epoch" in str(err) and "unknown key" in str(err)


def test_wrong_type_in_defaults(tmp_path):
    path = write_study(tmp_path, lambda r: r["defaults"]["sft"].__setitem__("epochs", "many"))
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "defaults.sft.epochs" in str(err)


def test_unknown_stage_in_pipeline(tmp_path):
    path = write_study(tmp_path, lambda r: r["pipelines"]["smoke"].__setitem__("stages", ["prepare_data", "sft", "ppo"]))
    err = config_error(path, "smoke")
    assert str(path) in str(err)
    assert "pipelines.smoke.stages" in str(err) and "'ppo'" in str(err) and "unknown stage" in str(err)


def test_unknown_pipeline():
    err = config_error(PIPELINES, "nope")
    assert str(PIPELINES) in str(err) and "'nope'" in str(err)
    for name in PIPELINE_NAMES:
        assert name in str(err)


def test_unknown_task_in_pipeline(tmp_path):
    path = write_study(tmp_path, lambda r: r["pipelines"]["smoke"].__setitem__("tasks", ["gap", "nope"]))
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "pipelines.smoke.tasks" in str(err) and "'nope'" in str(err)


def test_unknown_key_via_override():
    err = config_error(PIPELINES, "smoke", ["sft.epoch=2"])
    assert "--set sft.epoch=2" in str(err) and "sft.epoch" in str(err) and "unknown key" in str(err)


def test_unknown_section_via_override():
    err = config_error(PIPELINES, "smoke", ["sfft.epochs=2"])
    assert "--set sfft.epochs=2" in str(err) and "'sfft'" in str(err)


def test_unknown_task_via_override():
    err = config_error(PIPELINES, "smoke", ["tasks.nope.alphabet=3"])
    assert "--set tasks.nope.alphabet=3" in str(err) and "'nope'" in str(err)


def test_wrong_type_via_override():
    err = config_error(PIPELINES, "smoke", ["sft.epochs=many"])
    assert "--set sft.epochs=many" in str(err) and "sft.epochs" in str(err)


def test_out_of_range_via_override():
    err = config_error(PIPELINES, "smoke", ["sft.lr=-1"])
    assert "--set sft.lr=-1" in str(err) and "sft.lr" in str(err)


def test_override_without_equals():
    err = config_error(PIPELINES, "smoke", ["sft.epochs"])
    assert "--set sft.epochs" in str(err) and "KEY=VALUE" in str(err)
    with pytest.raises(ConfigError):
        parse_override("=3")
    with pytest.raises(ConfigError):
        parse_override("sft..epochs=3")


def test_stage_list_not_closed(tmp_path):
    path = write_study(tmp_path, lambda r: r["pipelines"]["smoke"].__setitem__("stages", ["prepare_data", "offline_dpo"]))
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "pipelines.smoke.stages" in str(err)
    assert "'offline_dpo'" in str(err) and "'sft'" in str(err)


def test_stage_list_not_closed_via_override():
    err = config_error(PIPELINES, "smoke", ["pipeline.stages=[prepare_data,offline_dpo]"])
    assert "pipelines.smoke.stages" in str(err) and "'sft'" in str(err)


def test_preferences_task_without_source(tmp_path):
    path = write_study(tmp_path, lambda r: r["tasks"]["hh-rlhf"].pop("source"))
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "tasks.hh-rlhf" in str(err) and "source" in str(err)


def test_min_len_above_max_len(tmp_path):
    err = config_error(PIPELINES, "smoke", ["tasks.gap.min_len=9"])
    assert "tasks.gap" in str(err) and "min_len" in str(err)


def test_invalid_yaml_syntax(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("defaults:\n  sft: [1, 2\ntasks: {}\n")
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "YAML" in str(err)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    err = config_error(path, "smoke")
    assert str(path) in str(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "no such file" in str(err)


def test_bad_pipeline_set_names_file_and_key(tmp_path):
    path = write_study(tmp_path, lambda r: r["pipelines"]["smoke"]["set"].__setitem__("sft.epoc", 1))
    err = config_error(path, "smoke")
    assert str(path) in str(err) and "pipelines.smoke.set" in str(err) and "sft.epoc" in str(err)


def test_bad_pipeline_set_is_not_blamed_on_cli_override(tmp_path):
    path = write_study(tmp_path, lambda r: r["pipelines"]["smoke"]["set"].__setitem__("sft.epochs", "x"))
    err = config_error(path, "smoke", ["sft.lr=0.1"])
    assert str(path) in str(err) and "pipelines.smoke.set" in str(err)
    assert "sft.lr=0.1" not in str(err)


# --------------------------------------------------------------------------- overrides


def test_overrides_change_values():
    base = load_study(PIPELINES, "study-v1")
    study = load_study(PIPELINES, "study-v1", ["sft.epochs=7", "pipeline.seeds=[0,1]", "tasks.gap.alphabet=10",
                                              "model.preset=base", "offline_dpo.beta=0.5"])
    assert base.defaults.sft.epochs == RAW["defaults"]["sft"]["epochs"] != 7
    assert study.defaults.sft.epochs == 7
    assert study.spec.seeds == [0, 1]
    assert study.tasks["gap"].alphabet == 10
    assert study.defaults.model.preset == "base"
    assert study.defaults.offline_dpo.beta == 0.5
    assert {n.spec.seed for n in build_plan(study)} == {0, 1}
    assert study.defaults.reward_model == base.defaults.reward_model  # untouched


def test_pipeline_set_is_applied_and_cli_beats_it():
    smoke = load_study(PIPELINES, "smoke")
    own = RAW["pipelines"]["smoke"]["set"]
    assert own["sft.epochs"] != RAW["defaults"]["sft"]["epochs"]
    assert smoke.defaults.sft.epochs == own["sft.epochs"]
    assert smoke.defaults.prepare_data.n_sft == own["prepare_data.n_sft"]
    beaten = load_study(PIPELINES, "smoke", ["sft.epochs=5"])
    assert beaten.defaults.sft.epochs == 5 != own["sft.epochs"]
    assert beaten.defaults.prepare_data.n_sft == own["prepare_data.n_sft"]  # the rest of the set still applies
    # another pipeline's set does not leak
    assert load_study(PIPELINES, "default").defaults.prepare_data.n_sft == RAW["defaults"]["prepare_data"]["n_sft"]


def test_later_override_wins():
    assert load_study(PIPELINES, "smoke", ["sft.epochs=2", "sft.epochs=4"]).defaults.sft.epochs == 4


def test_loading_does_not_mutate_the_file(tmp_path):
    path = write_study(tmp_path)
    before = path.read_text()
    load_study(path, "smoke", ["sft.epochs=9"])
    assert path.read_text() == before


def test_defaults_seed_is_used_by_a_pipeline_without_seeds(tmp_path):
    def mutate(raw):
        raw["defaults"]["seed"] = 5
        raw["pipelines"]["smoke"].pop("seeds")

    study = load_study(write_study(tmp_path, mutate), "smoke")
    assert {n.spec.seed for n in build_plan(study)} == {5}


# --------------------------------------------------------------------------- frozen


def test_configs_are_frozen():
    study = load_study(PIPELINES, "smoke")
    with pytest.raises(pydantic.ValidationError):
        study.defaults.sft.epochs = 9
    with pytest.raises(pydantic.ValidationError):
        study.spec.seeds = [1]
    with pytest.raises(pydantic.ValidationError):
        study.tasks["gap"].alphabet = 3
    with pytest.raises(pydantic.ValidationError):
        study.pipeline = "default"
    spec = study.stage_spec("sft", "gap", 0)
    with pytest.raises(pydantic.ValidationError):
        spec.seed = 1
    node = build_plan(study)[0]
    with pytest.raises(AttributeError):
        node.id = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- fingerprints


def fp(overrides=(), stage="sft", task="gap", seed=0, policy=None) -> str:
    study = load_study(PIPELINES, "default", list(overrides))
    return study.stage_spec(stage, task, seed, policy=policy).fingerprint()


@pytest.mark.parametrize(
    "stage, override",
    [
        ("sft", "sft.lr=0.002"),
        ("sft", "sft.epochs=4"),
        ("sft", "sft.max_length=80"),
        ("sft", "model.preset=base"),
        ("sft", "model.vocab_size=512"),
        ("prepare_data", "tasks.gap.alphabet=10"),
        ("prepare_data", "prepare_data.n_sft=100"),
        ("prepare_data", "prepare_data.bt_temperature=0.5"),
        ("offline_dpo", "offline_dpo.beta=0.5"),
        ("offline_dpo", "offline_dpo.loss_type=ipo"),
        ("reward_model", "reward_model.lr=0.01"),
        ("evaluate", "evaluate.temperature=0.7"),
        ("evaluate", "evaluate.samples_per_prompt=8"),
    ],
)
def test_fingerprint_changes_with_result_fields(stage, override):
    policy = "sft" if stage == "evaluate" else None
    assert fp([override], stage, policy=policy) != fp([], stage, policy=policy)


def test_fingerprint_covers_seed_and_policy():
    for stage in STAGE_NAMES:
        policy = "sft" if stage == "evaluate" else None
        assert fp(stage=stage, seed=0, policy=policy) != fp(stage=stage, seed=1, policy=policy)
    assert fp(stage="evaluate", policy="sft") != fp(stage="evaluate", policy="offline_dpo")


@pytest.mark.parametrize(
    "stage, override",
    [
        ("sft", "sft.logging_steps=1"),
        ("reward_model", "reward_model.logging_steps=1"),
        ("offline_dpo", "offline_dpo.logging_steps=3"),
        ("evaluate", "evaluate.batch_size=7"),
        ("evaluate", "evaluate.table_rows=3"),
        ("reward_model", "reward_model.val_batch_size=8"),
        # a stage's fingerprint covers only its own config
        ("sft", "offline_dpo.beta=0.5"),
        ("sft", "evaluate.temperature=0.5"),
        ("prepare_data", "sft.lr=0.01"),
        ("prepare_data", "tasks.short.alphabet=10"),
        ("offline_dpo", "sft.lr=0.01"),
    ],
)
def test_fingerprint_ignores_non_result_fields(stage, override):
    policy = "sft" if stage == "evaluate" else None
    assert fp([override], stage, policy=policy) == fp([], stage, policy=policy)


def test_fingerprint_ignores_task_name():
    study = load_study(PIPELINES, "default")
    # sft sees its task only through the data artifact: the label does not change the fingerprint
    assert study.stage_spec("sft", "gap", 0).fingerprint() == study.stage_spec("sft", "short", 0).fingerprint()
    spec = study.stage_spec("prepare_data", "gap", 0)
    renamed = spec.model_copy(update={"task_name": "gap-renamed"})
    assert renamed.task_name == "gap-renamed"
    assert renamed.fingerprint() == spec.fingerprint()
    # ...but the task's content does
    assert study.stage_spec("prepare_data", "short", 0).fingerprint() != spec.fingerprint()


def test_fingerprint_is_stable_and_hex():
    a, b = fp(), fp()
    assert a == b and len(a) == 64 and int(a, 16) >= 0


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_cli_show(in_root, capsys):
    from flows.cli import main

    assert main(["show", "smoke"]) == 0
    out = capsys.readouterr().out
    doc = yaml.safe_load(out)
    assert doc["pipeline"] == "smoke"
    assert doc["defaults"]["sft"]["epochs"] == RAW["pipelines"]["smoke"]["set"]["sft.epochs"]
    assert doc["nodes"] and all("fingerprint" in v for v in doc["nodes"].values())


def test_cli_show_with_override(in_root, capsys):
    from flows.cli import main

    assert main(["show", "smoke", "--set", "sft.epochs=6"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["defaults"]["sft"]["epochs"] == 6


def test_cli_list(in_root, capsys):
    from flows.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in PIPELINE_NAMES:
        assert f"{name}:" in out


def test_cli_run_bad_override_writes_nothing(in_root, capsys, monkeypatch, tmp_path):
    from flows.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("ROADS_HOME", str(home))
    assert main(["run", "smoke", "--set", "sft.epoch=1"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("roads: error:")
    assert "sft.epoch" in lines[0]
    assert not home.exists()


def test_cli_run_unknown_pipeline(in_root, capsys, monkeypatch, tmp_path):
    from flows.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("ROADS_HOME", str(home))
    assert main(["run", "nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roads: error:") and "'nope'" in lines[0]
    assert not home.exists()


def test_cli_missing_file(in_root, capsys, tmp_path):
    from flows.cli import main

    assert main(["show", "smoke", "--file", str(tmp_path / "nope.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no such file" in lines[0]


def test_cli_help_mentions_every_command(in_root, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("list", "show", "run", "stage", "report", "ui"):
        assert command in out


def test_a_missing_local_data_file_fails_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"tasks\.hh-rlhf\.source: no file at 'data/nope\.jsonl'") as info:
        load_study(PIPELINES, "hh-rlhf-smoke", ["tasks.hh-rlhf.source=data/nope.jsonl"])
    assert "\n" not in str(info.value)
    load_study(PIPELINES, "hh-rlhf-smoke", ["tasks.hh-rlhf.source=Anthropic/hh-rlhf"])  # a hub name is not checked


# --------------------------------------------------------------------------- inputs named by settings (issue 4)


def test_online_dpo_verifier_must_be_a_verifier_entry():
    err = config_error(PIPELINES, "h1", ["variants.online_dpo_data.set={start: sft, verifier: prepare_data}"])
    assert "'online_dpo_data'" in str(err) and "verifier" in str(err) and "reward_model" in str(err)


def test_online_dpo_verifier_must_be_in_the_pipeline():
    err = config_error(PIPELINES, "h2", ["online_dpo.verifier=local_rm"])
    assert "needs 'local_rm'" in str(err)


def test_data_must_name_a_data_stage():
    err = config_error(PIPELINES, "h4", ["variants.offline_dpo_narrow.set={data: sft}"])
    assert "'offline_dpo_narrow'" in str(err) and "prepare_data, narrow_data" in str(err)


def test_reward_model_start_must_be_an_sft_entry():
    err = config_error(PIPELINES, "scale", ["variants.reward_model_small.set={start: reward_model}"])
    assert "'reward_model_small'" in str(err) and "must be one of: sft" in str(err)


def test_gap_policies_must_be_policies():
    err = config_error(PIPELINES, "h5", ["measure_gap.policies=[reward_model]"])
    assert "policy.reward_model" in str(err)


def test_a_pipeline_set_that_breaks_the_stage_graph_is_caught_when_the_file_loads(tmp_path):
    path = write_study(tmp_path, lambda r: r["pipelines"]["scale"]["set"].__setitem__("measure_gap.verifiers", ["nowhere"]))
    with pytest.raises(ConfigError) as info:
        load_study_file(path)
    assert "pipelines.scale.stages" in str(info.value) and "'nowhere'" in str(info.value)


def test_inputs_follow_the_settings():
    from roads.plan import stage_inputs

    study = load_study(PIPELINES, "hypotheses")
    narrow = stage_inputs("online_dpo", study.params("online_dpo_narrow"))
    # on the calibrated testbed the DPO settings both roads share come from the select_dpo rule
    assert narrow == {"data": "narrow_data", "reference": "sft", "start": "sft", "verifier": "reward_model_narrow",
                      "selection": "select_dpo"}
    assert stage_inputs("online_dpo", study.params("online_dpo_data"))["verifier"] == "offline_dpo"
    assert "verifier" not in stage_inputs("online_dpo", study.params("online_dpo_gold"))
    gap = stage_inputs("measure_gap", study.params("measure_gap"))
    assert gap["verifier.local_rm"] == "local_rm" and gap["verifier.offline_dpo"] == "offline_dpo" and gap["policy.sft"] == "sft"
    scale = load_study(PIPELINES, "scale")
    assert stage_inputs("reward_model", scale.params("reward_model_base"))["sft"] == "sft_base"


def test_online_dpo_still_inherits_dpo_settings_but_not_its_own_fields():
    study = load_study(PIPELINES, "hypotheses", ["offline_dpo.beta=0.3"])
    assert study.params("online_dpo_aug3")["beta"] == 0.3
    assert study.params("online_dpo_aug3")["prompt_multiplier"] == 3
    assert study.params("online_dpo_sft")["verifier"] == "reward_model"


def test_the_report_is_wired_to_every_gap_and_evaluate_node():
    study = load_study(PIPELINES, "gap-smoke")
    nodes = build_plan(study)
    report = next(n for n in nodes if n.id == "report")
    expected = {n.id for n in nodes if n.stage in ("measure_gap", "evaluate")}
    assert set(report.inputs.values()) == expected and any(i.endswith("/measure_gap") for i in expected)


@pytest.mark.parametrize("override", ["sft.epochs=-1", "offline_dpo.lr=0", "reward_model.lr=-1e-4", "online_rl.epochs=0"])
def test_a_stage_that_changes_a_default_keeps_its_bounds(override):
    with pytest.raises(ConfigError, match="greater than 0"):
        load_study(Path(__file__).resolve().parents[2] / "pipelines.yaml", "smoke", [override])


def test_the_old_name_arms_says_it_is_now_variants(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("tasks: {gap: {family: gap}}\narms: {x: {stage: sft}}\npipelines: {p: {tasks: [gap]}}\n")
    with pytest.raises(ConfigError, match=r"old.yaml: arms: the section is now called 'variants'"):
        load_study_file(old)
    err = config_error(PIPELINES, "smoke", ["arms.offline_dpo_2x.set={epochs: 2}"])
    assert "'arms' is now called 'variants'; write variants.offline_dpo_2x.set" in str(err)


def test_online_dpo_shares_only_the_dpo_objective_and_optimiser_with_offline_dpo():
    from roads.settings import DPO_SHARED

    assert DPO_SHARED == ("beta", "loss_type", "rpo_alpha", "lr", "epochs", "batch_size", "precompute_ref", "select")
    shared = {"beta": 0.3, "loss_type": "rpo", "rpo_alpha": 0.5, "lr": 1e-4, "epochs": 3.0, "batch_size": 8,
              "precompute_ref": False}
    own = {"pair_fraction": 0.5, "data": "narrow_data", "max_length": 32, "logging_steps": 3}
    study = load_study(PIPELINES, "hypotheses", [f"offline_dpo.{k}={v}" for k, v in {**shared, **own}.items()])
    online, defaults = study.params("online_dpo_sft"), load_study(PIPELINES, "hypotheses").params("online_dpo_sft")
    assert {k: online[k] for k in shared} == shared
    assert {k: online[k] for k in own} == {k: defaults[k] for k in own}  # the offline road's own settings stay there
    # a setting online_dpo sets itself wins over the shared one
    study = load_study(PIPELINES, "hypotheses", ["offline_dpo.beta=0.3", "online_dpo.beta=0.05"])
    assert study.params("online_dpo_sft")["beta"] == 0.05

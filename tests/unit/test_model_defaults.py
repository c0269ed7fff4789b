"""Per-model defaults (issue 14 item 7): a run on pretrained weights takes learning rates for pretrained weights (LoRA's
with model.lora) and max_length from the data, unless the pipeline's set or --set names the key; `roads show` prints
them with the reason; runs without model.pretrained are untouched (test_fingerprints holds the built-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from roads.config import load_study, load_study_file
from roads.data.preferences import load_preferences
from roads.model_defaults import LENGTH_STAGES, PRETRAINED_LRS
from support import HH_FILE

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"


def pretrained_folder(root: Path, context: int) -> str:
    """A local 'pretrained' folder: a byte-level tokenizer (no chat template) and a Llama config of ``context``
    positions — what the per-model defaults read."""
    from transformers import LlamaConfig

    from roads.models import build_tokenizer

    folder = root / f"model-{context}"
    build_tokenizer(["Human: hello there Assistant: hi, how can I help?"]).save_pretrained(folder)
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=context).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {"long": pretrained_folder(root, 1 << 15), "short": pretrained_folder(root, 256)}


@pytest.fixture(autouse=True)
def in_project(monkeypatch):
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    monkeypatch.chdir(ROOT)  # pipelines.yaml names the HH-RLHF file relative to the project


def test_no_pretrained_model_no_per_model_defaults():
    for name in load_study_file(PIPELINES).pipelines:
        study = load_study(PIPELINES, name)
        if not study.defaults.model.pretrained:
            assert study.model_defaults == {}, name
            assert "model_defaults" not in study.resolved()


def test_pretrained_runs_take_pretrained_learning_rates_unless_set(models):
    plain = load_study(PIPELINES, "hh-rlhf-smoke")
    full = load_study(PIPELINES, "hh-rlhf-smoke", [f"model.pretrained={models['long']}"])
    lora = load_study(PIPELINES, "hh-rlhf-smoke", [f"model.pretrained={models['long']}", "model.lora.rank=8"])
    mine = load_study(PIPELINES, "hh-rlhf-smoke", [f"model.pretrained={models['long']}", "sft.lr=7.0e-5",
                                                   "offline_dpo={lr: 4.0e-6, epochs: 1, max_length: 256}"])
    assert plain.params("sft")["lr"] == 1e-3 and plain.params("offline_dpo")["lr"] == 5e-5
    for key, (for_full, for_lora) in PRETRAINED_LRS.items():
        stage, name = key.split(".")
        assert full.params(stage)[name] == for_full and lora.params(stage)[name] == for_lora, key
    assert full.params("online_dpo")["lr"] == PRETRAINED_LRS["offline_dpo.lr"][0]  # shared with offline_dpo
    assert full.params("reward_model_judge")["lr"] == PRETRAINED_LRS["reward_model.lr"][0]  # variants inherit
    assert mine.params("sft")["lr"] == 7e-5 and mine.params("offline_dpo")["lr"] == 4e-6  # the user's, kept
    assert mine.params("reward_model")["lr"] == PRETRAINED_LRS["reward_model.lr"][0]
    assert "sft.lr" not in mine.model_defaults and "offline_dpo.lr" not in mine.model_defaults
    # the stage spec (so the fingerprint and the cache key) carries the value used
    assert full.stage_spec("sft", "hh-rlhf", 0).params["lr"] == 3e-5
    assert full.stage_spec("sft", "hh-rlhf", 0).fingerprint() != plain.stage_spec("sft", "hh-rlhf", 0).fingerprint()


def test_max_length_comes_from_the_data_and_the_models_context(models):
    from transformers import AutoTokenizer

    study = load_study(PIPELINES, "hh-rlhf-smoke", [f"model.pretrained={models['long']}"])
    # hh-rlhf-smoke sets sft, reward_model and offline_dpo's max_length (256): kept; the other stages' from the data
    assert study.params("sft")["max_length"] == 256 and study.params("reward_model")["max_length"] == 256
    length = study.params("online_dpo")["max_length"]
    assert all(study.params(s)["max_length"] == length for s in LENGTH_STAGES if s not in
               ("sft", "reward_model", "offline_dpo"))
    assert study.params("online_rl")["max_length"] == 64  # bounds prompt + max_new_tokens: not from the data
    tokenizer = AutoTokenizer.from_pretrained(models["long"])
    rows = list(load_preferences(str(HH_FILE), format="hh-rlhf", limit=200))
    sizes = [len(tokenizer(r["prompt"] + max(r["chosen"], r["rejected"], key=len))["input_ids"]) + 1 for r in rows]
    fits = lambda n: sum(s <= n for s in sizes) / len(sizes)  # noqa: E731
    assert length % 32 == 0 and fits(length) >= 0.95 and fits(length - 32) < 0.95
    assert "95% of task 'hh-rlhf'" in study.model_defaults["online_dpo.max_length"]["why"]
    short = load_study(PIPELINES, "hh-rlhf-smoke", [f"model.pretrained={models['short']}"])
    assert length > 256 and short.params("online_dpo")["max_length"] == 256  # at most the model's context


def test_roads_show_prints_the_per_model_defaults(models, capsys):
    from flows.cli import main

    assert main(["show", "hh-rlhf-smoke", "--set", f"model.pretrained={models['long']}", "--set",
                 "model.lora.rank=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["defaults"]["sft"]["lr"] == 2e-4
    assert shown["model_defaults"]["sft.lr"] == {"value": 2e-4, "why": "pretrained weights with LoRA"}
    assert "q_sft.lr" not in shown["model_defaults"]  # only the stages the pipeline runs
    assert shown["model_defaults"]["offline_dpo.lr"]["value"] == 1e-4


def test_a_file_whose_defaults_name_the_model_is_written_for_it(models, tmp_path):
    raw = yaml.safe_load(PIPELINES.read_text())
    raw["defaults"]["model"]["pretrained"] = models["long"]
    raw["tasks"]["hh-rlhf"]["source"] = str(HH_FILE)
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = load_study(path, "hh-rlhf-smoke")
    assert study.model_defaults == {} and study.params("sft")["lr"] == raw["defaults"]["sft"]["lr"]


def test_roads_show_hh_rlhf_prints_the_lora_learning_rates_it_will_use(capsys):
    """The README's `roads show hh-rlhf`: SmolLM2-135M with LoRA, the per-model learning rates of the stages it runs
    (whether or not the model is fetched here: its max_length is set by the pipeline)."""
    from flows.cli import main

    assert main(["show", "hh-rlhf"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["defaults"]["model"]["lora"]["rank"] == 16
    assert {k: v["value"] for k, v in shown["model_defaults"].items()} == {
        "sft.lr": 2e-4, "reward_model.lr": 1e-4, "offline_dpo.lr": 1e-4}
    assert shown["defaults"]["sft"]["max_length"] == 512 and shown["defaults"]["evaluate"]["judge"] == "reward_model_judge"

"""Issue 16's bad-family matrix, beside issue 15's bad-input matrix (tests/flows/test_bad_input.py, whose fixture and
checks it reuses): a task family of the user's own that is not right — a class that does not meet the TaskFamily
Protocol, a module that does not import, a setting its Settings refuses, a gold reward that is not a finite float in
its declared range on a handful of sampled pairs, a demonstrator writing outside its symbols, a tokenizer that cannot
encode its demonstrations — stops ``roads run`` (and ``roads sweep``) with exit 2 and one line naming the task and the
class, before anything runs: no state folder, no Prefect server, no MLflow run.

The families are in tests/flows/own_family (bad.py: one mistake each on top of family.py's Reverse), copied into a
project folder the command runs from, as a user's package would be."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from test_bad_input import ROOT, SECONDS, fresh, nothing_written, prefect_server  # noqa: F401 - fixtures

OWN = Path(__file__).parent / "own_family"


def project_with(tmp: Path, family: str, settings: dict | None = None, sweep: bool = False) -> Path:
    """A user's project in ``tmp``: the own_family package and a study file whose task ``mine`` is ``family``; the
    command runs from there."""
    shutil.copytree(OWN, tmp / "own_family", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    doc: dict = {"tasks": {"mine": {"family": family, **(settings or {})}},
                 "pipelines": {"default": {"tasks": ["mine"], "seeds": [0], "stages": ["prepare_data", "sft"]}}}
    if sweep:
        doc["sweeps"] = {"grid": {"pipeline": "default", "runner": "process", "grid": {"sft.lr": [0.001, 0.002]}}}
    (tmp / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    os.chdir(tmp)
    return tmp / "study.yaml"


def family(path: str, **settings):
    def setup(tmp, monkeypatch):
        return ["run", "--file", str(project_with(tmp, path, settings))]
    return setup


def sweep_of(path: str):
    def setup(tmp, monkeypatch):
        return ["sweep", "grid", "--file", str(project_with(tmp, path, sweep=True))]
    return setup


def wordlevel_model(tmp: Path) -> str:
    """A saved model whose tokenizer knows whole words only (no letters d, e, f: they become <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from roads.models import new_causal_lm

    vocab = ["<unk>", "<pad>", "<bos>", "<eos>", "reverse:", "->", "a", "b", "c"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>")
    new_causal_lm("tiny", tokenizer, seed=0).save_pretrained(tmp / "words")
    tokenizer.save_pretrained(tmp / "words")
    return str(tmp / "words")


def pretrained_words(tmp, monkeypatch):
    study = project_with(tmp, "own_family.family:Reverse")
    return ["run", "--file", str(study), "--set", f"model.pretrained={wordlevel_model(tmp)}"]


CLASS = "own_family.bad:"
# id -> (setup(tmp, monkeypatch) -> argv, what the one error line must say)
CASES = {
    "not-a-family": (family(CLASS + "NoGoldReward"), [CLASS + "NoGoldReward", "lacks gold_reward", "TaskFamily"]),
    "no-such-module": (family("own_family.nosuch:Reverse"), ["own_family.nosuch:Reverse", "no module"]),
    "no-such-class": (family("own_family.family:Reverser"), ["own_family.family:Reverser", "has no 'Reverser'"]),
    "unknown-setting": (family("own_family.family:Reverse", max_lenn=3), ["tasks.mine", "max_lenn: unknown key",
                                                                            "Reverse.Settings"]),
    "reward-above-range": (family(CLASS + "RewardAboveRange"), ["tasks.mine", CLASS + "RewardAboveRange",
                                                                "returned 2.0", "reward_range [0, 1]"]),
    "reward-nan": (family(CLASS + "RewardNaN"), ["tasks.mine", "RewardNaN", "returned nan", "not a finite float"]),
    "reward-text": (family(CLASS + "RewardText"), ["tasks.mine", "RewardText", "returned '1.00'",
                                                   "not a finite float"]),
    "reward-raises": (family(CLASS + "RewardRaises"), ["tasks.mine", "RewardRaises", "gold_reward raised "
                                                       "ZeroDivisionError", "the empty response"]),
    "demonstrator-off-vocabulary": (family(CLASS + "DemonstratorOffVocabulary"),
                                    ["tasks.mine", "DemonstratorOffVocabulary", "a demonstration at noise",
                                     "outside its response_symbols"]),
    "tokenizer-cannot-encode": (pretrained_words, ["tasks.mine", "own_family.family:Reverse (Reverse)",
                                                   "the tokenizer of model.pretrained", "cannot encode"]),
    "sweep-bad-reward": (sweep_of(CLASS + "RewardNaN"), ["sweeps.grid: point", "tasks.mine", "RewardNaN",
                                                         "returned nan"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_family_fails_before_anything_starts(case, fresh, monkeypatch, capsys):
    setup, says = CASES[case]
    cwd = os.getcwd()
    try:
        argv = setup(fresh, monkeypatch)
        capsys.readouterr()  # what making the case printed (a saved model's progress bar)
        start = time.perf_counter()
        code = main(argv)
        elapsed = time.perf_counter() - start
    finally:
        os.chdir(cwd)
        for name in [m for m in sys.modules if m.split(".")[0] == "own_family"]:
            del sys.modules[name]  # each case's copy is a fresh package
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("roads: error: "), err
    for part in says:
        assert part in lines[0], f"{part!r} not in: {lines[0]}"
    assert elapsed < SECONDS, f"{case} took {elapsed:.1f} s"
    nothing_written(fresh, {})


FAST = ["not-a-family", "reward-above-range", "demonstrator-off-vocabulary"]


def test_a_bad_family_as_a_new_user_runs_it_exit_2_in_seconds_no_prefect_no_mlflow(fresh, monkeypatch):
    """The real process from the user's project folder: exit 2, one line, Prefect and MLflow never imported, and
    quick — the family is checked without importing torch or transformers."""
    probe = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
             "sys.stdout.write(repr(sorted(m for m in ('prefect', 'mlflow', 'transformers') if m in sys.modules)));"
             " sys.exit(code)")
    cwd = os.getcwd()
    try:
        for case in FAST:
            tmp = fresh / case
            tmp.mkdir()
            monkeypatch.setenv("ROADS_HOME", str(tmp / "home"))
            argv = CASES[case][0](tmp, monkeypatch)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", probe, *argv], cwd=tmp, capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            elapsed = time.perf_counter() - start
            assert proc.returncode == 2, (case, proc.returncode, proc.stderr)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("roads: error: "), (case, proc.stderr)
            assert all(part in lines[0] for part in CASES[case][1]), (case, lines[0])
            assert proc.stdout.splitlines()[-1] == "[]", (case, proc.stdout)
            assert elapsed < SECONDS, f"{case} took {elapsed:.1f} s"
            nothing_written(tmp, {})
    finally:
        os.chdir(cwd)

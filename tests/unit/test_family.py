"""roads.data.family (issue 16): the TaskFamily Protocol every gold-reward family meets, built-in or the user's own by
``package.module:Class``; loading and checking a class (one line naming it), its Settings validated and fingerprinted as
the task's keys, the source digest that puts its code in the cache key, the preflight's check of its rewards,
demonstrations and tokenizer, and examples/pipelines.yaml (every pipeline and sweep loads and plans)."""

from __future__ import annotations

import math
import random
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from roads.config import load_study, load_study_file
from roads.data.family import (GAP_CLASSES, PRESET_SPECIAL, TaskFamily, build, check_family, family_class,
                               gap_class_of, load_class, preset_tokenizer, protocol_problem, source_digest,
                               source_files)
from roads.errors import ConfigError, DataError
from roads.plan import build_plan
from roads.settings import TaskConfig

ROOT = Path(__file__).resolve().parents[2]
OWN = ROOT / "tests" / "flows" / "own_family"  # the test family, written as a user writes one (not in roads/)
EXAMPLES = ROOT / "examples" / "pipelines.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project folder on sys.path holding a copy of tests/flows/own_family; its modules forgotten after."""
    shutil.copytree(OWN, tmp_path / "own_family", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("own_family", "fam_pkg", "single_fam", "helper_mod",
                                                                 "badfam")]:
        del sys.modules[name]


def task(family: str, **settings) -> TaskConfig:
    return TaskConfig(family=family, **settings)


# --------------------------------------------------------------------------- the Protocol


def test_builtin_families_meet_the_protocol_and_declare_their_class():
    import roads.validity

    for name in ("shuffle", "gap", "short", "hidden", "star"):
        cls = family_class(name)
        assert protocol_problem(cls) is None, name
        family = build(task(name))
        assert isinstance(family, TaskFamily)
        assert family.gap_class == roads.validity.GAP_CLASSES[name] and family.gap_class in GAP_CLASSES
        check_family(name, task(name))  # the preflight's check passes every built-in


def test_a_user_family_by_path_is_built_from_its_settings(project):
    t = task("own_family.family:Reverse", min_len=2, max_len=3)
    assert t.settings == {"min_len": 2, "max_len": 3}
    family = build(t)
    assert isinstance(family, TaskFamily) and type(family).__module__ == "own_family.family"
    rng = random.Random(0)
    xs = family.sample_prompt_symbols(rng)
    assert 2 <= len(xs) <= 3
    prompt, best = family.prompt(xs), family.response(family.target(xs))
    assert family.gold_reward(prompt, best) == 1.0  # r* is the family's own (own_family.reward)
    assert family.gold_reward(prompt, family.response(["z"] * len(xs))) == 0.0
    assert gap_class_of("own_family.family:Reverse") == "closed (generation)"
    check_family("mine", t, preset_vocab_size=384)


def test_the_example_family_meets_the_protocol(monkeypatch):
    monkeypatch.chdir(ROOT)
    t = load_study(EXAMPLES, "subset-sum-smoke").tasks["subset-sum"]
    family = build(t)
    assert type(family).__name__ == "SubsetSum" and family.gap_class == "gap"
    rng = random.Random(1)
    for _ in range(20):
        xs = family.sample_prompt_symbols(rng)
        assert family.gold_reward(family.prompt(xs), family.response(family.target(xs))) == 1.0  # a target exists
    check_family("subset-sum", t, preset_vocab_size=384)


def test_user_settings_are_validated_defaulted_and_fingerprinted(project):
    assert task("own_family.family:Reverse").settings == {"min_len": 3, "max_len": 5}  # the defaults filled in
    study = project / "study.yaml"
    study.write_text(yaml.safe_dump({"tasks": {"mine": {"family": "own_family.family:Reverse"}},
                                     "pipelines": {"p": {"tasks": ["mine"], "stages": ["prepare_data"]}}}))

    def fingerprint(*overrides: str) -> str:
        node, = build_plan(load_study(study, "p", list(overrides)))
        return node.spec.fingerprint()

    assert fingerprint("tasks.mine.max_len=4") != fingerprint()  # a setting changes prepare_data's key
    assert fingerprint("tasks.mine.max_len=5") == fingerprint()  # its default written out does not


@pytest.mark.parametrize("settings, says", [
    ({"max_lenn": 4}, ["tasks.mine", "max_lenn: unknown key", "Reverse.Settings"]),
    ({"max_len": "four"}, ["tasks.mine", "max_len", "Reverse.Settings"]),
    ({"max_len": 99}, ["tasks.mine", "max_len", "less than or equal to 8"]),
])
def test_a_bad_setting_of_a_user_family_is_one_line_when_the_file_loads(project, settings, says):
    study = project / "study.yaml"
    study.write_text(yaml.safe_dump({"tasks": {"mine": {"family": "own_family.family:Reverse", **settings}},
                                     "pipelines": {"p": {"tasks": ["mine"], "stages": ["prepare_data"]}}}))
    with pytest.raises(ConfigError) as info:
        load_study(study, "p")
    message = str(info.value)
    assert "\n" not in message and str(study) in message
    for part in says:
        assert part in message, (part, message)


# --------------------------------------------------------------------------- classes that are not families


BAD_MODULE = '''
from pydantic import BaseModel

class S(BaseModel):
    n: int = 3

class NoReward:
    Settings = S
    reward_range = (0.0, 1.0)
    gap_class = "gap"
    response_symbols = "ab"
    @classmethod
    def from_settings(cls, s): return cls()
    def sample_prompt_symbols(self, rng): return ["a"]
    def prompt(self, xs): return "p ->"
    def target(self, xs): return ["a"]
    def response(self, ys): return "".join(" " + y for y in ys)
    def demonstrate(self, xs, noise, rng): return ["a"]

class PlainSettings(NoReward):
    Settings = dict
    def gold_reward(self, prompt, response): return 0.5

class NotCallable(NoReward):
    gold_reward = 0.5

not_a_class = NoReward()
'''


@pytest.mark.parametrize("path, says", [
    ("badfam.nosuch:X", ["family badfam.nosuch:X", "no module 'badfam.nosuch'"]),
    ("badfam.mod:Missing", ["family badfam.mod:Missing", "has no 'Missing'"]),
    ("badfam.mod:NoReward", ["family badfam.mod:NoReward", "NoReward", "lacks gold_reward", "TaskFamily"]),
    ("badfam.mod:PlainSettings", ["PlainSettings", "Settings must be a pydantic model"]),
    ("badfam.mod:NotCallable", ["NotCallable", "gold_reward must be methods"]),
    ("badfam.mod:not_a_class", ["not_a_class", "not a class"]),
    ("badfam.broken:X", ["family badfam.broken:X", "importing badfam.broken failed", "ZeroDivisionError"]),
])
def test_a_class_that_is_not_a_family_is_one_line_naming_it(tmp_path, monkeypatch, path, says):
    (tmp_path / "badfam").mkdir()
    (tmp_path / "badfam" / "__init__.py").write_text("")
    (tmp_path / "badfam" / "mod.py").write_text(BAD_MODULE)
    (tmp_path / "badfam" / "broken.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError) as info:
            family_class(path)
        assert "\n" not in str(info.value) and info.value.exit_code == 2
        for part in says:
            assert part in str(info.value), (part, str(info.value))
    finally:
        for name in [m for m in sys.modules if m.startswith("badfam")]:
            del sys.modules[name]


def test_an_unknown_builtin_name_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown family 'nosuch'.*shuffle.*package.module:Class"):
        family_class("nosuch")


# --------------------------------------------------------------------------- the preflight's check of a family


def variant(project: Path, body: str) -> TaskConfig:
    """own_family.family:Reverse with ``body`` appended to its module (a method or attribute overridden)."""
    module = project / "own_family" / "family.py"
    module.write_text(module.read_text() + "\n\nclass Bad(Reverse):\n" + textwrap.indent(textwrap.dedent(body), "    "))
    return task("own_family.family:Bad")


@pytest.mark.parametrize("body, says", [
    ("def gold_reward(self, prompt, response):\n    return 1.5\n", ["returned 1.5", "reward_range [0, 1]"]),
    ("def gold_reward(self, prompt, response):\n    return float('nan')\n", ["returned nan", "not a finite float"]),
    ("def gold_reward(self, prompt, response):\n    return True\n", ["returned True", "not a finite float"]),
    ("def gold_reward(self, prompt, response):\n    return None\n", ["returned None"]),
    ("def gold_reward(self, prompt, response):\n    return {}['x']\n", ["gold_reward raised KeyError"]),
    ("reward_range = (0.0, float('inf'))\n", ["reward_range must be two finite numbers"]),
    ("gap_class = 'huge'\n", ["gap_class must be one of", "'huge'"]),
    ("def demonstrate(self, xs, noise, rng):\n    return ['Z'] + xs\n", ["a demonstration at noise 0.3", "'Z'",
                                                                          "outside its response_symbols"]),
    ("def prompt(self, xs):\n    return ''\n", ["prompt() returned ''"]),
    ("def sample_prompt_symbols(self, rng):\n    raise RuntimeError('no prompts')\n",
     ["sample_prompt_symbols failed", "RuntimeError: no prompts"]),
])
def test_a_bad_reward_or_demonstrator_is_one_line_naming_task_and_class(project, body, says):
    t = variant(project, body)
    with pytest.raises(DataError) as info:
        check_family("mine", t, preset_vocab_size=384)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert message.startswith("tasks.mine: family own_family.family:Bad (Bad): "), message
    for part in says:
        assert part in message, (part, message)


def test_a_tokenizer_that_cannot_encode_the_demonstrations_is_caught(project):
    """A pretrained tokenizer without the family's symbols (a word-level vocabulary with an unknown token): the
    demonstration does not decode back. The preset's byte-level BPE encodes everything."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["reverse:", "->", "a", "b", "c"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    t = task("own_family.family:Reverse")
    with pytest.raises(DataError) as info:
        check_family("mine", t, tokenizer=tokenizer)
    assert "the tokenizer of model.pretrained" in str(info.value) and "cannot encode" in str(info.value)
    assert "own_family.family:Reverse (Reverse)" in str(info.value)
    check_family("mine", t, preset_vocab_size=384)


def test_the_preflights_preset_tokenizer_is_the_sft_stages():
    """preset_tokenizer builds roads.models.build_tokenizer's BPE without importing transformers: the same ids."""
    from roads.models import SPECIAL, build_tokenizer

    assert list(PRESET_SPECIAL) == list(SPECIAL.values())
    corpus = [f"sum {i}: {' '.join(str((i * 7 + j) % 9 + 1) for j in range(5))} -> 3 4" for i in range(40)]
    ours, theirs = preset_tokenizer(corpus, 300), build_tokenizer(corpus, vocab_size=300)
    for text in corpus[:5] + ["sum 99: 1 2 -> 9", "unseen ÿ text"]:
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False)["input_ids"]


def test_a_symbol_the_restricted_policy_cannot_sample_is_caught(project):
    """A response symbol the preset's BPE writes only as byte fragments (no token of its own that decodes to it) is a
    response a policy restricted to the task's symbols cannot write."""
    t = variant(project, """
        response_symbols = "abcdef\\u2603"
        def demonstrate(self, xs, noise, rng):
            return ["\\u2603" if i == 0 else y for i, y in enumerate(self.target(xs))]
    """)
    with pytest.raises(DataError) as info:
        check_family("mine", t, preset_vocab_size=260)  # 256 bytes + 4 specials: no merges at all
    assert "may not sample" in str(info.value) and "response_vocab: task" in str(info.value)


# --------------------------------------------------------------------------- its source, in the cache key


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_the_source_digest_follows_the_family_and_its_packages_imports_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / "fam_pkg" / "__init__.py", "")
    write(tmp_path / "fam_pkg" / "family.py", """
        import math
        from .reward import score
        from fam_pkg.util import helper
        import torch  # an installed package: not part of the family's source
        """)
    write(tmp_path / "fam_pkg" / "reward.py", "from . import deep\ndef score(): return 1\n")
    write(tmp_path / "fam_pkg" / "deep.py", "X = 1\n")
    write(tmp_path / "fam_pkg" / "util.py", "def helper(): return 2\n")
    write(tmp_path / "fam_pkg" / "unrelated.py", "Y = 1\n")
    write(tmp_path / "notes.txt", "not code\n")
    try:
        names = sorted(p.name for p in source_files("fam_pkg.family:F"))
        assert names == ["__init__.py", "deep.py", "family.py", "reward.py", "util.py"]
        digest = source_digest("fam_pkg.family:F")
        for unrelated in (tmp_path / "fam_pkg" / "unrelated.py", tmp_path / "notes.txt"):
            unrelated.write_text(unrelated.read_text() + "# edited\n")
            assert source_digest("fam_pkg.family:F") == digest, unrelated
        for edited in ("family.py", "reward.py", "deep.py", "util.py"):
            file = tmp_path / "fam_pkg" / edited
            file.write_text(file.read_text() + "# edited\n")
            assert source_digest("fam_pkg.family:F") != digest, edited
            digest = source_digest("fam_pkg.family:F")
    finally:
        for name in [m for m in sys.modules if m.startswith("fam_pkg")]:
            del sys.modules[name]


def test_a_single_file_family_counts_the_sibling_modules_it_imports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / "single_fam.py", "import json\nimport helper_mod\nclass F: pass\n")
    write(tmp_path / "helper_mod.py", "Z = 1\n")
    write(tmp_path / "other_mod.py", "W = 1\n")
    digest = source_digest("single_fam:F")
    assert sorted(p.name for p in source_files("single_fam:F")) == ["helper_mod.py", "single_fam.py"]
    (tmp_path / "other_mod.py").write_text("W = 2\n")
    assert source_digest("single_fam:F") == digest
    (tmp_path / "helper_mod.py").write_text("Z = 2\n")
    assert source_digest("single_fam:F") != digest


def test_an_edited_family_module_is_imported_again(project):
    """A long-lived process (a sweep's flow, a worker) runs the edited reward, as the cache key says."""
    cls = load_class("own_family.family:Reverse")
    assert cls.gap_class == "closed (generation)"
    assert load_class("own_family.family:Reverse") is cls  # unchanged: not reimported
    module = project / "own_family" / "family.py"
    module.write_text(module.read_text().replace('gap_class = "closed (generation)"', 'gap_class = "gap"'))
    assert load_class("own_family.family:Reverse").gap_class == "gap"


def test_a_user_familys_source_is_in_prepare_datas_cache_key_only(project, monkeypatch, tmp_path):
    """tasks/keys.py: the family's source digest is part of prepare_data's key (every later stage follows through the
    data's digest); a built-in family's key holds no user source."""
    from tasks.keys import cache_key

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "tasks": {"mine": {"family": "own_family.family:Reverse"}, "gap": {"family": "gap"}},
        "pipelines": {"p": {"tasks": ["mine", "gap"], "seeds": [0], "stages": ["prepare_data", "sft"]}}}))

    def keys() -> dict[str, str]:
        return {n.id: cache_key(n.spec, {}) for n in build_plan(load_study(study, "p")) if n.stage == "prepare_data"}

    before = keys()
    reward = project / "own_family" / "reward.py"
    reward.write_text(reward.read_text() + "\n# edited\n")
    after = keys()
    assert after["mine/seed0/prepare_data"] != before["mine/seed0/prepare_data"]
    assert after["gap/seed0/prepare_data"] == before["gap/seed0/prepare_data"]


# --------------------------------------------------------------------------- examples/pipelines.yaml


@pytest.mark.parametrize("name", list(yaml.safe_load(EXAMPLES.read_text())["pipelines"]))
def test_every_example_pipeline_loads_and_plans(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # `roads run NAME --file examples/pipelines.yaml` from the project folder
    study = load_study(EXAMPLES, name)
    nodes = build_plan(study)
    assert {n.name for n in nodes} == set(study.spec.stages)
    data = [n for n in nodes if n.stage == "prepare_data"]
    assert data and all(n.spec.task.family == "examples.subset_sum:SubsetSum" for n in data)


def test_the_example_sweep_over_a_user_family_loads_and_passes_the_preflight(monkeypatch, tmp_path):
    """Sweeps work with a user family: every point plans, the points share the stages the grid does not touch (the
    family's data and SFT), and the sweep's preflight checks the family, writing nothing."""
    from flows.preflight import preflight_sweep
    from roads.sweep import load_sweep

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))
    sweeps = load_study_file(EXAMPLES).sweeps
    assert list(sweeps) == ["subset-sum-beta"]
    _, points = load_sweep(EXAMPLES, "subset-sum-beta")
    assert len(points) == 2
    plans = [{n.id: n.spec.fingerprint() for n in build_plan(study)} for _, study in points]
    for node in ("subset-sum/seed0/prepare_data", "subset-sum/seed0/sft", "subset-sum/seed0/reward_model"):
        assert plans[0][node] == plans[1][node]
    assert plans[0]["subset-sum/seed0/offline_dpo"] != plans[1]["subset-sum/seed0/offline_dpo"]
    report = preflight_sweep("subset-sum-beta", points)
    assert report["stages"] > 0 and not (tmp_path / "home").exists()

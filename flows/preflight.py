"""Preflight: every input a run needs, checked before anything starts — no state folder created, no Prefect server,
no MLflow run, no record. Each mistake is one line naming the file, record, column or key and how to fix it, raised as
a ``ConfigError`` or ``DataError`` (exit 2).

What is checked, for the stages that will run (a stage that is a cache hit reads nothing):

- the stage names ``roads stage NAME`` / ``--force`` ask for;
- the state folder (``$ROADS_HOME``, else ``./.roads``): a folder, or creatable under a folder; writable (a temporary
  file is created in it, or in the nearest folder above it, and removed); enough free space for the estimate of
  what the run writes (:func:`estimate_bytes`), refused only when the free space is below it;
- every real-data source of a ``prepare_data`` that will run: read with the loader the stage uses
  (``roads.data.preferences.load_preferences``: exists, is a file, opens, decompresses, is UTF-8, parses, has the
  columns with the right types, the ``limit`` applied), then not degenerate: at least two distinct prompts (the
  stage holds some out), and not every chosen response equal to its rejected one (a reward model would learn
  nothing: accuracy 0.5) or empty. Synthetic families need no file;
- ``model.pretrained`` of an ``sft`` that will run: a non-empty folder with weights whose config and tokenizer load
  (``AutoConfig``/``AutoTokenizer``: small files, no weights read), or a ``.gguf`` file whose metadata gives both
  (the gguf package installed); a hub name loads its config and tokenizer from
  the hub or the local cache, and while ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set fails at once if they
  are not cached, saying so;
- every gold-reward family of a ``prepare_data`` that will run, built-in or the user's own class
  (``roads.data.family.check_family``): on a handful of sampled prompts its gold reward is a finite float in its
  ``reward_range`` (target, demonstrations, empty response), its demonstrations stay in its ``response_symbols``, and
  for a user family the study's tokenizer encodes them (the preset's BPE, or ``model.pretrained``'s).

A check that passed is remembered in-process while the file is unchanged (a sweep's points share their data), so
calling the preflight again costs only the state-folder check.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

from roads.artifacts import state_home
from roads.config import Study
from roads.data.preferences import load_preferences, offline_flag
from roads.errors import ConfigError, DataError, RoadsError
from roads.plan import Node, build_plan
from roads.settings import TaskConfig
from roads.stage_table import STAGES

MB = 2**20
# The estimate of what a run writes (rough, meant as an upper bound of the usual, so that a refusal means clearly
# short). Measured on a 130-stage store of the tiny preset: mlflow.db 7.5 MB, mlruns 16 MB, prefect 8.9 MB, logs
# 0.2 MB; each stage folder ≤ 0.65 MB of which ≈0.42 MB is the model.
FIXED_BYTES = 64 * MB  # one run's MLflow database, Prefect home and logs
PER_STAGE_BYTES = MB  # every stage that will run: its output besides a model, MLflow artifacts, result record
MODEL_KINDS = ("policy", "verifier")  # stages that save a model (save_pretrained)
# fp32 parameters of the presets (roads/models.py PRESETS, without the embedding) and their hidden size: the saved
# model is 4 bytes x (these + vocab_size x hidden), plus the tokenizer
PRESET_PARAMS = {"tiny": (81_920, 64), "small": (790_528, 128), "base": (4_743_168, 256)}
TOKENIZER_BYTES = MB // 4
GZ_RATIO = 4  # a .gz source's text is about this many times its size; prepare_data writes it again as splits
GGUF_RATIO = 8  # float32 bytes per byte of a quantised GGUF (Q4_1 is 5 bits a weight: 6.4; Q8_0 4.3)
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf")

_passed: dict[tuple, None] = {}  # checks that passed in this process, keyed by what they read


# --------------------------------------------------------------------------- entry points


def check_stages(study: Study, force_stage: str | None = None, only_stage: str | None = None) -> None:
    """``roads stage NAME`` (and ``--force``): the stage must be one of the pipeline's."""
    for stage in (force_stage, only_stage):
        if stage and stage not in study.spec.stages:
            raise ConfigError(f"pipeline {study.pipeline!r} has no stage {stage!r}; its stages: "
                              f"{', '.join(study.spec.stages)}")


def preflight(study: Study, *, force_stage: str | None = None, only_stage: str | None = None,
              todo: list[Node] | None = None) -> dict:
    """Check everything the run of ``study`` needs (the module doc); raise ConfigError/DataError on the first
    mistake, having written nothing. ``todo``: the nodes that will run, when the caller has them already (else
    :func:`stages_to_run`). Returns what was checked: ``{"seconds", "stages" (that will run), "sources", "models",
    "home", "estimate_bytes", "free_bytes"}``."""
    start = time.perf_counter()
    check_stages(study, force_stage, only_stage)
    if todo is None:
        todo = stages_to_run(study, force_stage, only_stage)
    return _check([(study, todo)], start)


def preflight_sweep(sweep: str, points: Iterable[tuple[object, Study]]) -> dict:
    """The preflight of every point of a sweep (``roads.sweep.load_sweep``'s ``(point, study)`` list): a mistake
    names the point; the space estimate counts a stage several points share once."""
    start = time.perf_counter()
    plans, labels = [], []
    for point, study in points:
        labels.append(f"sweeps.{sweep}: point {getattr(point, 'name', point)}: ")
        plans.append((study, stages_to_run(study)))
    return _check(plans, start, labels)


def stages_to_run(study: Study, force_stage: str | None = None, only_stage: str | None = None) -> list[Node]:
    """The plan's nodes that are not cache hits now (read from the store without writing; a store that does not
    exist yet has none)."""
    from flows.outcome import select
    from tasks.keys import cached_results

    nodes = select(build_plan(study), only_stage)
    known = cached_results(nodes, {n.id for n in nodes if force_stage and n.stage == force_stage})
    return [n for n in nodes if n.id not in known]


def _check(plans: list[tuple[Study, list[Node]]], start: float, labels: list[str] | None = None) -> dict:
    folder = check_home()
    sources: dict[str, None] = {}
    models: dict[str, None] = {}
    for i, (study, todo) in enumerate(plans):
        try:
            for node in todo:
                if node.stage == "prepare_data" and node.spec.task is not None and node.spec.task.source:
                    check_data(node.spec.task_name, node.spec.task)
                    sources[node.spec.task.source] = None
                elif node.stage == "prepare_data" and node.spec.task is not None:
                    check_task_family(node.spec.task_name, node.spec.task, study)
            for node in todo:
                pretrained = node.spec.model.pretrained if node.stage == "sft" and node.spec.model else None
                if pretrained:
                    check_model(pretrained)
                    models[pretrained] = None
        except RoadsError as err:
            if not labels:
                raise
            raise type(err)(f"{labels[i]}{err}") from None
    need = estimate_bytes(plans)
    free = free_bytes(folder)
    if free < need:
        raise ConfigError(f"{home_label()}: {free / MB:.0f} MB free on its disk, and this run writes about "
                          f"{need / MB:.0f} MB ({sum(len(t) for _, t in plans)} stages); free some space, or point "
                          "ROADS_HOME at a disk with more room")
    return {"seconds": time.perf_counter() - start, "stages": sum(len(t) for _, t in plans), "sources": list(sources),
            "models": list(models), "home": str(state_home()), "estimate_bytes": need, "free_bytes": free}


# --------------------------------------------------------------------------- the state folder


def home_label() -> str:
    home = state_home()
    return f"ROADS_HOME={home}" if os.environ.get("ROADS_HOME") else f"the state folder {home} (./.roads; ROADS_HOME " \
                                                                    "moves it)"


def check_home() -> Path:
    """The state folder, or the nearest folder above it when it does not exist yet: a folder, writable. Returns that
    folder (where the free space is measured). Creates nothing that is left behind."""
    home = state_home()
    label = home_label()
    fix = "point ROADS_HOME at a folder you can write (e.g. ROADS_HOME=$HOME/.roads)"
    try:
        if home.exists() and not home.is_dir():
            raise ConfigError(f"{label} is a file, not a folder; {fix}")
        folder = home
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise ConfigError(f"{label}: {folder} is a file, so no folder can be made under it; {fix}")
    except OSError as err:
        raise ConfigError(f"{label}: cannot be looked at ({err.strerror or err}); {fix}") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".roads-preflight-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        where = "it" if folder == home else f"{folder}, where it would be created"
        raise ConfigError(f"{label}: cannot create a file in {where} ({err.strerror or err}); {fix}") from None
    return folder


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def model_bytes(study: Study) -> int:
    """The largest model an SFT of the study saves: a local pretrained folder's size, or a preset's fp32 weights (a
    hub model's size is not known before it is fetched: counted as the preset)."""
    sizes = [TOKENIZER_BYTES]
    pretrained = study.defaults.model.pretrained
    if pretrained:
        from roads.fetch import resolve_pretrained

        pretrained = resolve_pretrained(pretrained, must_exist=False)
    if pretrained and Path(pretrained).expanduser().is_dir():
        sizes.append(sum(f.stat().st_size for f in Path(pretrained).expanduser().rglob("*") if f.is_file()))
    elif pretrained and Path(pretrained).expanduser().is_file():  # a .gguf, saved dequantised to float32
        sizes.append(GGUF_RATIO * Path(pretrained).expanduser().stat().st_size)
    for entry in study.spec.stages:
        if study.stage_of(entry) == "sft":
            params, hidden = PRESET_PARAMS[study.params(entry).get("preset") or study.defaults.model.preset]
            sizes.append(4 * (params + study.defaults.model.vocab_size * hidden) + TOKENIZER_BYTES)
    return max(sizes)


def estimate_bytes(plans: list[tuple[Study, list[Node]]]) -> int:
    """What the stages that will run write, roughly: FIXED_BYTES, PER_STAGE_BYTES per stage, the model for each stage
    that saves one (``model_bytes``), and a real-data ``prepare_data`` its source again (GZ_RATIO x a .gz file). A
    stage several plans share (a sweep's points) counts once."""
    total, seen = FIXED_BYTES, set()
    for study, todo in plans:
        size = model_bytes(study)
        for node in todo:
            key = (node.stage, node.spec.fingerprint(), tuple(sorted(node.inputs.items())))
            if key in seen:
                continue
            seen.add(key)
            total += PER_STAGE_BYTES
            if STAGES[node.stage].kind in MODEL_KINDS:
                total += size
            source = node.spec.task.source if node.stage == "prepare_data" and node.spec.task else None
            if source and Path(source).expanduser().is_file():
                ratio = GZ_RATIO if source.lower().endswith(".gz") else 1
                total += ratio * Path(source).expanduser().stat().st_size
    return total


# --------------------------------------------------------------------------- data


def _file_key(path: Path) -> tuple:
    try:
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (str(path),)


def check_data(name: str, task: TaskConfig) -> int:
    """Read task ``name``'s real-data source as prepare_data will (format, split, limit) and check it is usable;
    returns the number of pairs. Raises DataError naming ``tasks.<name>`` and the file, line, record or column."""
    source = str(task.source)
    key = ("data", *_file_key(Path(source).expanduser()), task.format, task.split, task.limit)
    if key in _passed:
        return 0
    try:
        rows = load_preferences(source, format=task.format, split=task.split, limit=task.limit)
    except DataError as err:
        raise DataError(f"tasks.{name}: {err}") from None
    after = f" (the first {task.limit}: tasks.{name}.limit)" if task.limit else ""
    if all(r["chosen"] == r["rejected"] for r in rows):
        raise DataError(f"tasks.{name}: {source}: chosen is the same as rejected in every one of its {len(rows)} "
                        f"records{after}, so there is nothing to prefer (a reward model would stay at accuracy 0.5); "
                        "check which columns hold the two responses")
    if all(not r["chosen"].strip() for r in rows):
        raise DataError(f"tasks.{name}: {source}: every chosen response is empty in its {len(rows)} records{after}; "
                        "check the chosen column (with format hh-rlhf: the text after the last shared 'Assistant:')")
    prompts = len({r["prompt"] for r in rows})
    if prompts < 2:
        raise DataError(f"tasks.{name}: {source}: {len(rows)} record{'s' * (len(rows) != 1)}{after} but only "
                        f"{prompts} distinct prompt; "
                        f"prepare_data holds some prompts out, so it needs at least 2: give more records"
                        + (f" or raise tasks.{name}.limit" if task.limit else ""))
    _passed[key] = None
    return len(rows)


# --------------------------------------------------------------------------- task families


def check_task_family(name: str, task: TaskConfig, study: Study) -> None:
    """A gold-reward family (built-in or the user's ``package.module:Class``) of a ``prepare_data`` that will run: its
    rewards, prompts and demonstrations on a handful of sampled pairs (``roads.data.family.check_family``), and for a
    user family the tokenizer the study's SFT will use: the preset's byte-level BPE (trained on the sampled texts, no
    transformers import), or ``model.pretrained``'s once that passed ``check_model``. Raises DataError (one line)."""
    from roads.data.family import check_family, is_path, source_digest

    user = is_path(task.family)
    model = study.defaults.model
    pretrained = model.pretrained if user else None
    key = ("family", name, task, source_digest(task.family) if user else "",
           (("model", pretrained) if pretrained else ("preset", model.vocab_size)) if user else ())
    if key in _passed:
        return
    tokenizer = None
    if pretrained:
        check_model(pretrained)
        from roads.models import load_tokenizer

        tokenizer = load_tokenizer(pretrained)
    check_family(name, task, tokenizer=tokenizer, preset_vocab_size=model.vocab_size if user and not pretrained
                 else None)
    _passed[key] = None


# --------------------------------------------------------------------------- models


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (the rule of roads.models.load_pretrained, and anything that exists here)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:200] if text else type(err).__name__)


def check_model(name: str) -> None:
    """``model.pretrained``: a local folder with weights whose config and tokenizer load, a .gguf file whose metadata
    gives both, or a hub name whose config
    and tokenizer load (from the local cache when offline), or a fetched model's short name (``smollm2-135m``: its
    folder, or one line saying to fetch it). Raises ConfigError naming ``model.pretrained``."""
    from roads.fetch import MODELS, resolve_pretrained

    if name in MODELS:
        try:
            name = resolve_pretrained(name)
        except RoadsError as err:
            raise ConfigError(str(err)) from None
    path = Path(name).expanduser()
    local = _looks_local(name)
    gguf = name.endswith(".gguf") and path.is_file()
    key = ("model", *(_file_key(path if gguf else path / "config.json") if local else (name,)))
    if key in _passed:
        return
    fix = ("give a local folder with config.json, the tokenizer and the weights (what save_pretrained writes), or a "
           ".gguf file")
    kwargs = {}
    if gguf:  # config and tokenizer come from the file's metadata (transformers reads it with the gguf package)
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"model.pretrained: {name!r} is a GGUF file and reading it needs the gguf package: "
                              "pip install gguf==0.19.0")
        path, kwargs = path.parent, {"gguf_file": path.name}
    elif local:
        if not path.exists():
            raise ConfigError(f"model.pretrained: no folder at {name!r}; {fix}")
        if not path.is_dir():
            raise ConfigError(f"model.pretrained: {name!r} is a file, not a folder; {fix}")
        if not any(path.iterdir()):
            raise ConfigError(f"model.pretrained: {name!r} is an empty folder; {fix}")
        if not any(any(path.glob(pattern)) for pattern in WEIGHTS):
            raise ConfigError(f"model.pretrained: {name!r} has no weights (no {', '.join(WEIGHTS[:2])} file); {fix}")
    from transformers import AutoConfig, AutoTokenizer

    for what, load in (("config", AutoConfig.from_pretrained), ("tokenizer", AutoTokenizer.from_pretrained)):
        try:
            load(str(path) if local else name, **kwargs)
        except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError... for a bad model
            if local:
                raise ConfigError(f"model.pretrained: {name!r}: its {what} does not load ({_first_line(err)}); "
                                  f"{fix}") from None
            offline = offline_flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            if offline:
                raise ConfigError(f"model.pretrained: {name!r} is a hub name, {offline} is set (offline) and its "
                                  f"{what} is not in the local cache; {fix}, or fetch it once on a machine that can "
                                  "reach the hub") from None
            raise ConfigError(f"model.pretrained: cannot load the {what} of {name!r} from the hub "
                              f"({_first_line(err)}); check the name, or {fix}; without network set HF_HUB_OFFLINE=1 "
                              "so a hub name fails at once") from None
    _passed[key] = None

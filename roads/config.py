"""Strict, frozen pydantic models of ``pipelines.yaml``: load, merge overrides, resolve one config per stage, fingerprint.

The file has five sections::

    defaults:   seed, model, launch (multi-process training), and one section per stage (see STAGE_NAMES)
    tasks:      named tasks (a synthetic family with its sizes, or real preference data by path or hub name)
    variants:   named variants of a stage (its settings with ``set`` on top); each is a node of its own
    pipelines:  named recipes: which tasks, seeds and stages or variants, plus ``set`` overrides of the defaults
    sweeps:     named grids over any override keys (and seeds) of a pipeline, expanded by ``roads.sweep``

A stage's ``data``, ``start``, ``verifier`` (and ivl's ``base``/``target``, measure_gap's ``verifiers``/``policies``)
settings name the entries its inputs come from (see the stage table, ``roads/stage_table.py``). An override is ``KEY=VALUE`` with
KEY a dotted path: ``sft.epochs=2``, ``model.preset=small``, ``seed=3``, ``tasks.gap.alphabet=10``,
``variants.online_dpo_sft.set={start: sft}``, ``pipeline.seeds=[0,1,2]``. VALUE is parsed as YAML. Every mistake (unknown key, wrong
type, unknown stage, task or pipeline) raises :class:`ConfigError` with one line naming the file or override and
the key path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from roads.errors import ConfigError, DataError
from roads.settings import (SEED_BOUNDS, LaunchConfig, LoraConfig, ModelConfig, Seed, Strict, TaskConfig, new_setting,
                            no_fingerprint)
from roads.stage_table import LAUNCH_STAGES, LORA_STAGES, STAGE_NAMES, STAGES, accepts, stage_inputs, with_role

BASIC_STAGES = ("prepare_data", "sft", "reward_model", "offline_dpo", "evaluate")  # a pipeline's default `stages`


Defaults = create_model(
    "Defaults", __base__=Strict,
    __doc__="The study's defaults: the seed, the shared sections, and one section per stage of the stage table.",
    seed=(int, Field(0, **SEED_BOUNDS, description="the study seed; each pipeline's `seeds` replaces it")),
    model=(ModelConfig, ModelConfig()),
    launch=(LaunchConfig, LaunchConfig()),
    **{name: (stage.config, stage.config()) for name, stage in STAGES.items()},
)


class VariantConfig(Strict):
    """A named variant of a stage: the stage's settings with ``set`` on top. It is a node of its own."""

    stage: Literal[STAGE_NAMES]  # type: ignore[valid-type]
    set: dict[str, Any] = Field({}, description="overrides of the stage's settings")
    description: str = ""
    series: Optional[str] = Field(None, description="the learning curve (or other series) this variant is a point "
                                                    "of, named for the entry it varies: the report draws them as one")


class PipelineConfig(Strict):
    description: str = ""
    tasks: list[str] = Field(min_length=1)
    seeds: Optional[list[Seed]] = Field(None, min_length=1, description="seeds to run, each once; default: "
                                                                          "[defaults.seed]")
    stages: list[str] = Field(list(BASIC_STAGES), min_length=1, description="stages and variants to run")
    set: dict[str, Any] = Field({}, description="overrides of defaults, as in --set")

    @field_validator("seeds")
    @classmethod
    def _seeds_once(cls, seeds: Optional[list[int]]) -> Optional[list[int]]:
        repeated = sorted({s for s in seeds or [] if seeds.count(s) > 1})
        if repeated:  # the same (task, seed) twice would be one node run twice, and count twice in the report
            raise ValueError(f"seed {', '.join(map(str, repeated))} is repeated; give each seed once")
        return seeds


RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")


class SweepConfig(Strict):
    """A grid over any ``--set`` keys (and seeds) of one pipeline; each point of the grid runs the pipeline once."""

    description: str = ""
    pipeline: str = Field(description="the pipeline every point runs")
    grid: dict[str, list[Any]] = Field({}, description="KEY (as in --set) -> the values it takes; points = the product")
    seeds: Optional[list[Seed]] = Field(None, min_length=1, description="each seed a point of its own (a grid "
                                       "dimension); default: every point runs the pipeline's seeds")
    runner: Literal["ray", "process"] = Field("ray", description="ray: prefect-ray's task runner (a local cluster, "
                                              "or --ray-address / RAY_ADDRESS); process: a local process pool")
    workers: Optional[int] = Field(None, gt=0, description="CPUs of a local Ray cluster / processes of the pool "
                                   "(default: the machine's cores)")
    resources: dict[str, dict[str, float]] = Field({}, description="Ray resources per stage, or 'default' for "
                                                   "every stage: num_cpus, num_gpus, memory (bytes)")

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"grid.{key}: a value is repeated")
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a seed is repeated")
        for stage, res in self.resources.items():
            if stage != "default" and stage not in STAGE_NAMES:
                raise ValueError(f"resources.{stage}: not a stage; use a stage name or 'default'")
            for key, value in res.items():
                if key not in RESOURCE_KEYS:
                    raise ValueError(f"resources.{stage}.{key}: unknown resource; known: {', '.join(RESOURCE_KEYS)}")
                if value < 0:
                    raise ValueError(f"resources.{stage}.{key}: must be >= 0")
        return self


class StudyFile(Strict):
    defaults: Defaults = Defaults()
    tasks: dict[str, TaskConfig]
    variants: dict[str, VariantConfig] = {}
    pipelines: dict[str, PipelineConfig]
    sweeps: dict[str, SweepConfig] = {}




class StageSpec(Strict):
    """Everything one stage of one (task, seed) unit needs. Its fingerprint is half its cache key."""

    stage: str
    params: dict[str, Any]
    seed: int
    variant: str = no_fingerprint("", "the stage or variant this node runs (a label)")
    task_name: str = no_fingerprint("", "the task this unit belongs to (a label; the data reaches stages as an input)")
    model: Optional[ModelConfig] = None  # stages that build or load a policy from scratch
    task: Optional[TaskConfig] = None  # prepare_data only; later stages see the data through its artifact
    policy: Optional[str] = None  # evaluate: which policy (a stage or variant entry) is scored
    launch: Optional[LaunchConfig] = None  # LAUNCH_STAGES launched or in-process mixed precision; None: neither (not fingerprinted)
    lora: Optional[LoraConfig] = new_setting(None, "LORA_STAGES: model.lora (None: full fine-tuning)")

    def config(self) -> Strict:
        """The typed stage config (``SftConfig`` …)."""
        return STAGES[self.stage].config(**self.params)

    def fingerprint(self) -> str:
        return fingerprint(self)

    @property
    def launched(self) -> bool:
        """Runs through ``accelerate launch`` (a backend), not in the stage's own process."""
        return self.launch is not None and self.launch.backend != "none"


def resolve_params(entry: str, variants: dict[str, VariantConfig], defaults: Defaults) -> tuple[str, dict[str, Any]]:
    """(stage, settings) of a stage or variant: the stage's defaults, then — for a stage that ``shares`` settings with
    another (online_dpo: the DPO settings of offline_dpo) — those it does not set itself taken from the other's
    section, then the variant's overrides."""
    stage = variants[entry].stage if entry in variants else entry
    section = getattr(defaults, stage)
    params = section.model_dump()
    shares = STAGES[stage].shares
    if shares:
        other, shared = shares
        params.update({k: v for k, v in getattr(defaults, other).model_dump(include=set(shared)).items()
                       if k not in section.model_fields_set})
    if entry in variants:
        params.update(variants[entry].set)
    return stage, STAGES[stage].config(**params).model_dump()


class Study(Strict):
    """A resolved pipeline: the study file with all overrides applied, ready to plan."""

    pipeline: str
    path: str
    defaults: Defaults
    tasks: dict[str, TaskConfig]
    variants: dict[str, VariantConfig] = {}
    spec: PipelineConfig
    model_defaults: dict[str, Any] = Field({}, description="the per-model defaults this study took (key -> value and "
                                                           "why; roads/model_defaults.py), already in `defaults`")

    def stage_of(self, entry: str) -> str:
        """The stage module an entry of ``stages`` runs (a variant names its stage)."""
        return self.variants[entry].stage if entry in self.variants else entry

    def params(self, entry: str) -> dict[str, Any]:
        return resolve_params(entry, self.variants, self.defaults)[1]

    def stage_spec(self, entry: str, task_name: str, seed: int, policy: str | None = None) -> StageSpec:
        stage = self.stage_of(entry)
        return StageSpec(
            stage=stage,
            variant=entry,
            params=self.params(entry),
            seed=seed,
            task_name=task_name,
            model=self.defaults.model if "model" in STAGES[stage].reads or self._templated(stage, task_name) else None,
            task=self.tasks[task_name] if "task" in STAGES[stage].reads else None,
            policy=policy,
            launch=self.defaults.launch if stage in LAUNCH_STAGES and self.defaults.launch.in_use() else None,
            lora=self.defaults.model.lora if stage in LORA_STAGES else None,
        )

    def _templated(self, stage: str, task_name: str) -> bool:
        """prepare_data renders real conversations with the pretrained tokenizer's chat template: it then reads the
        model (its tokenizer counts in the cache key); for synthetic tasks and presets it does not."""
        task = self.tasks.get(task_name)
        return (stage == "prepare_data" and task is not None and task.family == "preferences"
                and task.chat_template == "auto" and bool(self.defaults.model.pretrained))

    def resolved(self) -> dict:
        """The fully resolved config, as ``roads show`` prints it."""
        return {
            "pipeline": self.pipeline,
            "file": self.path,
            **self.spec.model_dump(exclude={"set"}),
            "tasks": {name: self.tasks[name].model_dump() for name in self.spec.tasks},
            "variants": {name: v.model_dump() for name, v in self.variants.items() if name in self.spec.stages},
            "defaults": self.defaults.model_dump(),
            **({"model_defaults": {k: v for k, v in self.model_defaults.items()  # those of the stages it runs
                                   if k.split(".")[0] in {self.stage_of(e) for e in self.spec.stages}}}
               if self.model_defaults else {}),
        }


# --- fingerprint -------------------------------------------------------------------------------------------------
def _result_fields(model: BaseModel) -> dict:
    out = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("fingerprint") is False:
            continue
        value = getattr(model, name)
        if extra.get("fingerprint") == "unless_default" and value == field.default:
            continue  # a setting added later, at the default that reproduces the code before it
        out[name] = _result_fields(value) if isinstance(value, BaseModel) else value
    return out


def fingerprint(spec: StageSpec) -> str:
    """sha256 of the canonical JSON of every field that changes results (seed included, logging excluded)."""
    data = _result_fields(spec)
    data["params"] = _result_fields(spec.config())
    if data.get("launch") is None:  # in-process: the key is left out, so fingerprints from before `launch` hold
        data.pop("launch", None)
    if data.get("task") and data["task"].get("chat_template") == "auto":  # likewise for fingerprints from before it
        data["task"].pop("chat_template")
    data["arm"] = data.pop("policy")  # the field's name before it was `policy`: fingerprints from before the rename hold
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- loading and overrides -----------------------------------------------------------------------------------------
def _format_error(err: ValidationError, where: str, prefix: tuple = ()) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (*prefix, *first["loc"]))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our own validators' messages are sentences already
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{more}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, for example sft.epochs=2")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: empty key path")
    return key, _parse_value(value)


def _apply(raw: dict, pipeline: str, key: str, value: Any, where: str) -> None:
    """Set a dotted KEY in the raw study dict: `pipeline.X`, `tasks.NAME.X`, or a path inside `defaults`."""
    parts = key.split(".")
    if parts[0] == "pipeline":
        target, path = raw["pipelines"][pipeline], parts[1:]
    elif parts[0] == "variants":
        if len(parts) < 3 or parts[1] not in raw.get("variants", {}):
            known = ", ".join(sorted(raw.get("variants", {})))
            raise ConfigError(f"{where}: {key}: unknown variant {parts[1] if len(parts) > 1 else ''!r}; known: {known}")
        target, path = raw["variants"][parts[1]], parts[2:]
    elif parts[0] == "tasks":
        if len(parts) < 3 or parts[1] not in raw.get("tasks", {}):
            known = ", ".join(sorted(raw.get("tasks", {})))
            raise ConfigError(f"{where}: {key}: unknown task {parts[1] if len(parts) > 1 else ''!r}; known: {known}")
        target, path = raw["tasks"][parts[1]], parts[2:]
    else:
        if parts[0] == "arms":
            raise ConfigError(f"{where}: {key}: 'arms' is now called 'variants'; write variants.{'.'.join(parts[1:])}")
        if parts[0] not in Defaults.model_fields:
            known = ", ".join(["pipeline.*", "tasks.*", "variants.*", *Defaults.model_fields])
            raise ConfigError(f"{where}: {key}: unknown key {parts[0]!r}; known: {known}")
        raw.setdefault("defaults", {})
        target, path = raw["defaults"], parts
    if not path:
        raise ConfigError(f"{where}: {key}: name a field, for example {key}.epochs")
    for part in path[:-1]:
        nxt = target.get(part) if isinstance(target, dict) else None
        if nxt is None:
            target[part] = nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {key}: {part!r} is not a section")
        target = nxt
    target[path[-1]] = value


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: 10x faster on pipelines.yaml
    """YAML 1.1 as PyYAML reads it, except that ``1e-3`` and ``1.0e3`` are numbers (as in YAML 1.2 and JSON), not
    strings: the settings are strict, so a float field does not turn the string ``"1e-3"`` into a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)
_LOADER = _Loader


def read_study_file(path: str | Path) -> dict:
    """The file as a dict (a fresh copy each call: callers apply overrides to it). Parsed once per content."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass --file PATH or run from the project folder")
    return copy.deepcopy(_parse_study_file(str(path), path.read_bytes()))


@lru_cache(maxsize=8)
def _parse_study_file(path: str, content: bytes) -> dict:
    try:
        raw = yaml.load(content, Loader=_LOADER)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with defaults, tasks and pipelines")
    if "arms" in raw:  # the section's old name: say so rather than "unknown key"
        raise ConfigError(f"{path}: arms: the section is now called 'variants' (named variants of a stage); rename it")
    return raw


def load_study_file(path: str | Path) -> StudyFile:
    """The file, validated as written, and every pipeline checked with its own ``set`` applied."""
    raw = read_study_file(path)
    try:
        study = StudyFile(**raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path))) from None
    _check_variants(study, str(path))
    if study.defaults.launch.problem():
        raise ConfigError(f"{path}: defaults.launch.{study.defaults.launch.problem()}")
    for name in study.pipelines:
        with_set = _with_pipeline_set(copy.deepcopy(raw), study, name, str(path))
        _check_pipeline(with_set, name, with_set.pipelines[name], str(path))
    for name, sweep in study.sweeps.items():
        if sweep.pipeline not in study.pipelines:
            raise ConfigError(f"{path}: sweeps.{name}.pipeline: unknown pipeline {sweep.pipeline!r}; known: "
                              f"{', '.join(sorted(study.pipelines))}")
    return study


def _with_pipeline_set(raw: dict, study: StudyFile, pipeline: str, path: str) -> StudyFile:
    """Apply a pipeline's ``set`` to the raw file (in place) and validate the result."""
    where = f"{path}: pipelines.{pipeline}.set"
    if raw["pipelines"][pipeline].get("set") is None:
        raw["pipelines"][pipeline]["set"] = {}
    for key, value in study.pipelines[pipeline].set.items():
        _apply(raw, pipeline, key, value, where)
    return _validate(raw, where)


def _looks_local(source: str) -> bool:
    """A path rather than a hub dataset name: starts with . / ~, or ends with a data-file suffix."""
    return source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet", ".gz"))


def _check_variants(study: StudyFile, where: str) -> None:
    for name, variant in study.variants.items():
        if name in STAGE_NAMES:
            raise ConfigError(f"{where}: variants.{name}: a variant cannot take a stage's name; rename it")
        base = getattr(study.defaults, variant.stage, None)
        if base is None:
            raise ConfigError(f"{where}: variants.{name}.stage: {variant.stage!r} has no settings to vary")
        try:
            STAGES[variant.stage].config(**{**base.model_dump(), **variant.set})
        except ValidationError as err:
            raise ConfigError(_format_error(err, where, ("variants", name, "set"))) from None


def check_stage_closure(entries: list[str], variants: dict[str, VariantConfig] | None = None,
                        defaults: Defaults | None = None) -> str | None:
    """None when every entry's inputs (from its resolved settings, through the stage table) are provided by entries
    of the list, each with the role the input accepts; else a one-line reason."""
    variants, defaults = variants or {}, defaults or Defaults()
    present = set(entries)
    stage_of = {e: resolve_params(e, variants, defaults)[0] for e in entries}
    for entry in entries:
        stage, params = resolve_params(entry, variants, defaults)
        if STAGES[stage].kind == "report":
            if not any(STAGES[s].kind == "measure" for s in stage_of.values()):
                measures = " or ".join(sorted(repr(s) for s, row in STAGES.items() if row.kind == "measure"))
                return f"stage {stage!r} needs {measures}; add one to the list"
            continue
        for name, provider in stage_inputs(stage, params).items():
            if provider not in present:
                return f"{entry!r} needs {provider!r} (its input {name!r}); add it to the list"
            role = accepts(stage, name)
            if role not in STAGES[stage_of[provider]].roles:
                return (f"{entry!r} takes its input {name!r} from {provider!r}, a {stage_of[provider]} entry; "
                        f"it must be one of: {', '.join(with_role(role))}")
            if provider == entry:
                return f"{entry!r} cannot take its own output as its input {name!r}"
    return None


def _check_pipeline(study: StudyFile, name: str, pipe: PipelineConfig, where: str) -> None:
    for i, entry in enumerate(pipe.stages):
        if entry not in STAGE_NAMES and entry not in study.variants:
            known = ", ".join([*STAGE_NAMES, *study.variants])
            raise ConfigError(f"{where}: pipelines.{name}.stages.{i}: unknown stage or variant {entry!r}; known: {known}")
    for task in pipe.tasks:
        if task not in study.tasks:
            raise ConfigError(
                f"{where}: pipelines.{name}.tasks: unknown task {task!r}; known: {', '.join(sorted(study.tasks))}"
            )

    problem = check_stage_closure(pipe.stages, study.variants, study.defaults)
    if problem:
        raise ConfigError(f"{where}: pipelines.{name}.stages: {problem}")
    problem = _launch_problem(study, pipe)
    if problem:
        raise ConfigError(f"{where}: pipelines.{name}: {problem}")
    problem = _length_problem(study, pipe)
    if problem:
        raise ConfigError(f"{where}: pipelines.{name}: {problem}")


# GPT-2's pre-tokenizer pattern (what the presets' byte-level BPE splits text into before merging) for ASCII text:
# a merge never crosses one of these words, so a text is at least as many tokens as it has words, whatever the
# tokenizer learnt from the data.
_WORDS = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def _tokens_at_least(text: str) -> int:
    return len(_WORDS.findall(text))


@lru_cache(maxsize=64)
def task_lengths(task: TaskConfig) -> Optional[tuple[int, int, int]]:
    """For a synthetic task under the presets' tokenizer, in tokens at least: (its shortest prompt, its longest
    prompt, its longest prompt with that prompt's target response and EOS). None for real data, whose lengths only
    the data knows. Raises DataError for a task that cannot be built (a star too big for its alphabet)."""
    import random

    from roads.data import synthetic_task

    synthetic = synthetic_task(task)
    if synthetic is None:
        return None
    if ":" in task.family or not hasattr(synthetic, "symbols"):  # a user or text family: its prompts as sampled
        rng = random.Random(0)
        drawn = [synthetic.sample_prompt_symbols(rng) for _ in range(64)]
        prompts = [_tokens_at_least(synthetic.prompt(xs)) for xs in drawn]
        answers = [_tokens_at_least(synthetic.prompt(xs) + synthetic.response(synthetic.target(xs))) for xs in drawn]
        return min(prompts), max(prompts), max(answers) + 1
    if task.family == "star":  # every star prompt has the same shape: degree arms of arm_len nodes
        longest = shortest = synthetic.sample_prompt_symbols(random.Random(0))
    else:
        longest = [synthetic.symbols[i % task.alphabet] for i in range(task.max_len)]
        shortest = longest[: task.min_len]
    answer = synthetic.prompt(longest) + synthetic.response(synthetic.target(longest))
    return (_tokens_at_least(synthetic.prompt(shortest)), _tokens_at_least(synthetic.prompt(longest)),
            _tokens_at_least(answer) + 1)


def _length_problem(study: StudyFile, pipe: PipelineConfig) -> str | None:
    """A stage's ``max_length`` that a synthetic task of the pipeline cannot fit: shorter than the longest prompt with
    its target response and EOS (SFT, DPO, the reward models, Q-SFT, IVL would train on cut answers), or, for
    online_rl, leaving fewer tokens beside ``max_new_tokens`` than the shortest prompt has (it would drop every
    prompt). genrm sets its own length from its judge sequences. With ``model.pretrained`` the tokenizer is not the
    presets', and for real data the lengths are the data's: neither is known before the data is read."""
    if study.defaults.model.pretrained:
        return None
    tasks = {}
    for task_name in pipe.tasks:
        try:
            lengths = task_lengths(study.tasks[task_name])
        except DataError as err:
            return f"tasks.{task_name}: {err}"
        if lengths is not None:
            tasks[task_name] = lengths
    if not tasks:
        return None
    for entry in pipe.stages:
        stage = study.variants[entry].stage if entry in study.variants else entry
        if stage == "genrm" or "max_length" not in STAGES[stage].config.model_fields:
            continue
        params = resolve_params(entry, study.variants, study.defaults)[1]
        key = f"{stage}.max_length" if entry == stage else f"variants.{entry} ({stage}) max_length"
        length = params["max_length"]
        for task_name, (shortest, longest, answer) in tasks.items():
            if stage == "online_rl":
                budget = length - params["max_new_tokens"]
                if budget < shortest:
                    return (f"{key} {length} leaves {budget} tokens beside max_new_tokens {params['max_new_tokens']}, "
                            f"fewer than the shortest {task_name!r} prompt has ({shortest}): every prompt would be "
                            "dropped; raise max_length or lower max_new_tokens")
            elif length < answer:
                return (f"{key} {length} is shorter than the longest {task_name!r} prompt with its answer and EOS "
                        f"({answer} tokens at least, {longest} of them the prompt): its answers would be cut; raise "
                        "max_length")
    return None


def global_batch(stage: str, params: dict[str, Any]) -> int:
    """Examples (completions, for online_rl) per optimiser step: ``batch_size``, which online_rl rounds up to whole
    prompt groups of ``num_generations``."""
    batch = params["batch_size"]
    if stage == "online_rl":
        group = params["num_generations"]
        batch = -(-batch // group) * group
    return batch


def _launch_problem(study: StudyFile, pipe: PipelineConfig) -> str | None:
    """The launch section's own problem, then: every launched stage's global batch must split evenly over the
    processes."""
    launch = study.defaults.launch
    if launch.problem():
        return f"launch.{launch.problem()}"
    if launch.backend == "none":
        return None
    if study.defaults.model.lora is not None and launch.backend in ("fsdp", "deepspeed"):
        return (f"backend: model.lora merges each stage's adapter into the weights it saves, which {launch.backend}'s "
                "sharded parameters do not allow here; use backend ddp or none with model.lora")
    for entry in pipe.stages:
        stage = study.variants[entry].stage if entry in study.variants else entry
        if stage not in LAUNCH_STAGES:
            continue
        batch = global_batch(stage, resolve_params(entry, study.variants, study.defaults)[1])
        if batch % launch.num_processes:
            key = f"{stage}.batch_size" if entry == stage else f"variants.{entry} ({stage}) batch_size"
            return (f"{key} {batch} is not a multiple of launch.num_processes ({launch.num_processes}): the global "
                    "batch is split evenly over the processes; change one of them")
    return None


def _validate(raw: dict, where: str) -> StudyFile:
    try:
        return StudyFile(**raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, where)) from None


def load_study(path: str | Path, pipeline: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Load the file, pick a pipeline, apply its `set` overrides then the CLI overrides, validate everything."""
    base = load_study_file(path)  # validates the file as written
    if pipeline not in base.pipelines:
        raise ConfigError(f"{path}: unknown pipeline {pipeline!r}; known: {', '.join(sorted(base.pipelines))}")
    raw = read_study_file(path)
    study = _with_pipeline_set(raw, base, pipeline, str(path))
    for item in overrides:  # validated one at a time, so an error names the override that caused it
        key, value = parse_override(item)
        _apply(raw, pipeline, key, value, f"--set {item}")
        study = _validate(raw, f"--set {item}")
    spec = study.pipelines[pipeline]
    if spec.seeds is None:
        spec = spec.model_copy(update={"seeds": [study.defaults.seed]})
    _check_variants(study, f"{path} (after overrides)")
    _check_pipeline(study, pipeline, spec, f"{path} (after overrides)")
    for task in spec.tasks:  # only the tasks this run uses: a file another pipeline needs may be absent here
        source = study.tasks[task].source
        if source and _looks_local(source) and not Path(source).expanduser().exists():
            raise ConfigError(f"{path}: tasks.{task}.source: no file at {source!r} (relative paths start from "
                              f"{Path.cwd()}); fix the path, or give a hub dataset name")
    filled = {}
    if not base.defaults.model.pretrained:  # a file whose own defaults name the model is written for it
        from roads.model_defaults import model_defaults

        explicit = set(base.pipelines[pipeline].set) | {parse_override(item)[0] for item in overrides}
        filled = model_defaults(study.defaults.model.model_dump(),
                                {t: study.tasks[t].model_dump() for t in spec.tasks}, explicit)
        for key, (value, _) in filled.items():
            _apply(raw, pipeline, key, value, "model defaults")
        if filled:
            study = _validate(raw, f"{path}: the per-model defaults (roads/model_defaults.py)")
    return Study(pipeline=pipeline, path=str(path), defaults=study.defaults, tasks=study.tasks, variants=study.variants,
                 spec=spec, model_defaults={k: {"value": v, "why": why} for k, (v, why) in filled.items()})


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params."""
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, (dict, BaseModel)) else {name: value})
    return out

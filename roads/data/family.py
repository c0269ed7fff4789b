"""A task family: the one Protocol every gold-reward task implements, built-in or the user's own.

A task's ``family`` in ``pipelines.yaml`` is either a built-in short name (``shuffle``, ``gap``, ``short``,
``hidden``, ``star``: :mod:`roads.data.synthetic`, :mod:`roads.data.star`) or a class of the user's code by path,
``package.module:Class`` (importable from the working directory or ``PYTHONPATH``)::

    tasks:
      mine: {family: mypkg.tasks:SubsetSum, n_items: 6}   # every other key is a setting of SubsetSum.Settings

Both are loaded the same way (:func:`family_class`, :func:`build`) and used the same way by ``prepare_data``
(:func:`roads.data.synthetic.generate`), SFT (the response vocabulary), evaluate, online RL and the gap measurement
(the gold reward), and the report (the class of its gap). A user family's source (its module and the modules of its
own package that module imports) is part of the cache key of ``prepare_data`` and is written into the data's
``task.json``, so an edit to it reruns that task's stages and nothing else (:func:`source_digest`).
:func:`check_family` is what the preflight runs before anything starts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from roads.errors import ConfigError, DataError

PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
GAP_CLASSES = ("gap", "closed (generation)", "closed (verification)")  # roads.validity.GAP_CLASSES' values


@runtime_checkable
class TaskFamily(Protocol):
    """What a task family provides. A prompt is drawn as an object ``xs`` (whatever the family likes: a list of
    symbols, a graph) and written as text by ``prompt``; a response is a list of symbols written by ``response``.

    - ``Settings``: a pydantic model of the family's settings (the task's keys in ``pipelines.yaml``): validated
      when the file loads and fingerprinted (a changed setting reruns ``prepare_data`` and what follows).
    - ``from_settings(settings)``: the family for one validated ``Settings``.
    - ``reward_range``: ``(low, high)``, the range every ``gold_reward`` lies in (the preflight checks it).
    - ``gap_class``: where its generation–verification gap is: ``"gap"``, ``"closed (generation)"`` or
      ``"closed (verification)"`` (the report's validity section; the gap measurement must confirm it).
    - ``response_symbols``: the characters a response is made of, besides spaces: the vocabulary a policy restricted
      to the task may sample (``tasks.<name>.response_vocab: task``).
    - ``sample_prompt_symbols(rng)``: one prompt, drawn with ``rng`` (a ``random.Random`` seeded from the study's
      seed: prompts from a seed).
    - ``prompt(xs)`` -> the prompt's text; ``target(xs)`` -> the best response's symbols (r* = high on it);
      ``response(ys)`` -> a response's text (``" a b"``).
    - ``demonstrate(xs, noise, rng)``: the demonstrator: a response's symbols with edit probability ``noise``. SFT data
      is drawn at ``prepare_data.demo_noise``; the behaviour policy whose pairs are labelled by r* is the same
      demonstrator at ``prepare_data.behaviour_noise``.
    - ``gold_reward(prompt, response)``: r*(x, y), a finite float in ``reward_range``, from the texts.
    """

    Settings: ClassVar[type[BaseModel]]
    reward_range: tuple[float, float]
    gap_class: str
    response_symbols: str

    @classmethod
    def from_settings(cls, settings: BaseModel) -> "TaskFamily": ...

    def sample_prompt_symbols(self, rng: random.Random) -> Any: ...

    def prompt(self, xs: Any) -> str: ...

    def target(self, xs: Any) -> list[str]: ...

    def response(self, ys: list[str]) -> str: ...

    def demonstrate(self, xs: Any, noise: float, rng: random.Random) -> list[str]: ...

    def gold_reward(self, prompt: str, response: str) -> float: ...


MEMBERS = ("Settings", "from_settings", "reward_range", "gap_class", "response_symbols", "sample_prompt_symbols",
           "prompt", "target", "response", "demonstrate", "gold_reward")
METHODS = ("from_settings", "sample_prompt_symbols", "prompt", "target", "response", "demonstrate", "gold_reward")


def builtin() -> dict[str, type]:
    """The built-in short names and their classes."""
    from roads.data.star import StarTask
    from roads.data.synthetic import SyntheticTask

    return {"shuffle": SyntheticTask, "gap": SyntheticTask, "short": SyntheticTask, "hidden": SyntheticTask,
            "star": StarTask}


def is_path(family: object) -> bool:
    """A user family given as ``package.module:Class`` (not a built-in short name)."""
    return isinstance(family, str) and bool(PATH.match(family))


# --------------------------------------------------------------------------- loading

_digests: dict[str, str] = {}  # module name -> digest of its file when it was (re)imported in this process


def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: a family next to the study file's project
        importlib.invalidate_caches()
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
    if spec is None:
        return None
    return Path(spec.origin) if spec.origin and spec.origin not in ("built-in", "frozen") else None


def load_class(path: str) -> type:
    """The class at ``package.module:Class``; the module is imported again when its file changed since (so a long-lived
    process runs the edited reward, as the cache key says). Raises ConfigError (one line) when it cannot."""
    module_name, _, attr = path.partition(":")
    file = _module_file(module_name)
    if file is None:
        raise ConfigError(f"family {path}: no module {module_name!r} can be imported (from the working directory or "
                          "PYTHONPATH); check the path 'package.module:Class'")
    digest = _file_digest(file)
    try:
        module = sys.modules.get(module_name)
        if module is None:
            module = importlib.import_module(module_name)
        elif _digests.get(module_name) not in (None, digest):
            module = importlib.reload(module)
        _digests[module_name] = digest
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything on import
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"family {path}: importing {module_name} failed ({type(err).__name__}: {first})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"family {path}: module {module_name} has no {attr!r}")
    return cls


def protocol_problem(cls: Any) -> str | None:
    """Why ``cls`` does not meet :class:`TaskFamily`, or None."""
    if not isinstance(cls, type):
        return f"is a {type(cls).__name__}, not a class"
    missing = [m for m in MEMBERS if not hasattr(cls, m)]
    if missing:
        return f"does not meet the TaskFamily protocol: it lacks {', '.join(missing)} (roads.data.family)"
    not_callable = [m for m in METHODS if not callable(getattr(cls, m))]
    if not_callable:
        return f"does not meet the TaskFamily protocol: {', '.join(not_callable)} must be methods"
    if not (isinstance(cls.Settings, type) and issubclass(cls.Settings, BaseModel)):
        return "does not meet the TaskFamily protocol: Settings must be a pydantic model class"
    return None


def family_class(family: str) -> type:
    """The class of a built-in short name or a user path, checked against the Protocol (ConfigError otherwise)."""
    if not is_path(family):
        try:
            return builtin()[family]
        except KeyError:
            raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(builtin())}, preferences, or give "
                              "your own class as 'package.module:Class'") from None
    cls = load_class(family)
    problem = protocol_problem(cls)
    if problem:
        raise ConfigError(f"family {family}: {getattr(cls, '__qualname__', cls)} {problem}")
    return cls


def validate_settings(family: str, values: dict) -> dict:
    """A user family's settings, validated by its ``Settings`` (defaults filled in); ConfigError naming the key."""
    cls = family_class(family)
    try:
        return cls.Settings(**values).model_dump()
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "settings"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{loc}: {msg} ({cls.__qualname__}.Settings)") from None


def family_settings(task) -> BaseModel:
    """The ``Settings`` of a task config's family: a built-in's from the task's own fields, a user family's from
    ``task.settings``."""
    cls = family_class(task.family)
    if is_path(task.family):
        return cls.Settings(**task.settings)
    return cls.Settings(**{name: getattr(task, name) for name in cls.Settings.model_fields})


def build(task) -> TaskFamily:
    """The family object of a (synthetic or user) task config."""
    return family_class(task.family).from_settings(family_settings(task))


# --------------------------------------------------------------------------- its source, for the cache key


def _file_digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([.\w]+)[ \t]+import|import[ \t]+([\w.]+))", re.M)


def source_files(path: str) -> list[Path]:
    """The family's module file and, followed transitively, the files of the modules of its own top-level package
    (or folder) that it imports — not the standard library, roads or other installed packages."""
    module_name = path.partition(":")[0]
    first = _module_file(module_name)
    if first is None:
        return []
    top = module_name.split(".")[0]
    base = first.parent if "." not in module_name and first.name != "__init__.py" else None
    seen: dict[Path, None] = {}
    todo = [(module_name, first)]
    while todo:
        name, file = todo.pop()
        if file in seen or not file.is_file():
            continue
        seen[file] = None
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for match in _IMPORT.finditer(file.read_text()):
            other = match[1] or match[2]
            if other.startswith("."):
                level = len(other) - len(other.lstrip("."))
                parts = package.split(".")[: len(package.split(".")) - (level - 1)]
                other = ".".join([p for p in parts if p] + ([other.lstrip(".")] if other.lstrip(".") else []))
            if other.split(".")[0] != top and base is None:
                continue
            found = _module_file(other) if other else None
            if found is None or found in seen:
                continue
            if base is not None and found.parent != base:  # a single-file module: its sibling files only
                continue
            todo.append((other, found))
    return sorted(seen)


def source_digest(path: str) -> str:
    """sha256 over the names and bytes of :func:`source_files` (what an edit to the family changes)."""
    h = hashlib.sha256()
    for file in source_files(path):
        h.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- the preflight's check

N_CHECK = 8  # prompts the preflight samples (each with a demonstration, a behaviour draw and the target)


def check_family(name: str, task, tokenizer=None, noises: tuple[float, ...] = (0.3, 0.5)) -> None:
    """Build task ``name``'s family and try it on a handful of sampled (prompt, response) pairs: r* is a finite float
    in its ``reward_range`` on the target, on demonstrations at each of ``noises`` and on an empty response; the
    prompts and responses are text whose non-space characters are the family's ``response_symbols`` (responses) and
    that ``tokenizer`` (when given) encodes and decodes back. Raises DataError with one line naming the task and
    class."""
    where = f"tasks.{name}: family {task.family}"
    cls = family_class(task.family)
    label = f"{where} ({cls.__qualname__})" if is_path(task.family) else where
    try:
        family = cls.from_settings(family_settings(task))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{label}: from_settings failed ({type(err).__name__}: {err})") from None
    try:
        low, high = (float(v) for v in family.reward_range)
    except Exception:  # noqa: BLE001
        raise DataError(f"{label}: reward_range must be (low, high), got {getattr(family, 'reward_range', None)!r}") \
            from None
    if family.gap_class not in GAP_CLASSES:
        raise DataError(f"{label}: gap_class must be one of {', '.join(map(repr, GAP_CLASSES))}, got "
                        f"{family.gap_class!r}")
    symbols = set(str(family.response_symbols))
    rng = random.Random(0)
    for _ in range(N_CHECK):
        step = "sample_prompt_symbols"
        try:
            xs = family.sample_prompt_symbols(rng)
            step = "prompt"
            prompt = family.prompt(xs)
            step = "target"
            responses = {"its target": family.response(family.target(xs)), "the empty response": family.response([])}
            for noise in noises:
                step = "demonstrate"
                responses[f"a demonstration at noise {noise:g}"] = family.response(family.demonstrate(xs, noise, rng))
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{label}: {step} failed ({type(err).__name__}: {err})") from None
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{label}: prompt() returned {prompt!r}, not a non-empty string")
        for what, response in responses.items():
            if not isinstance(response, str):
                raise DataError(f"{label}: response() returned {type(response).__name__} for {what}, not a string")
            try:
                value = family.gold_reward(prompt, response)
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{label}: gold_reward raised {type(err).__name__} ({err}) on {prompt!r} with "
                                f"{what} {response!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise DataError(f"{label}: gold_reward returned {value!r} on {prompt!r} with {what} {response!r}: "
                                f"not a finite float in its reward_range [{low:g}, {high:g}]")
            if what == "the empty response":
                continue
            outside = sorted(set(response) - symbols - {" "})
            if outside:
                raise DataError(f"{label}: {what} {response!r} has {''.join(outside)!r}, outside its response_symbols "
                                f"{''.join(sorted(symbols))!r}: a policy restricted to the task could not write it")
            if tokenizer is not None:
                text = prompt + response
                back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"],
                                        clean_up_tokenization_spaces=False)
                if back != text:
                    raise DataError(f"{label}: the tokenizer cannot encode {what} {response!r} (after {prompt!r}): it "
                                    f"decodes back as {back[len(prompt):]!r}")

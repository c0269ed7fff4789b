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

import ast
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

from roads.errors import ConfigError, DataError, RoadsError

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
      ``"closed (verification)"`` (the report's validity section, which reads it from the class — or from the family
      built with its default ``Settings`` when it is a property — and runs the gap-class checks on a ``"gap"`` task;
      the gap measurement must confirm it).
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
    from roads.data.text import TextTask

    return {"shuffle": SyntheticTask, "gap": SyntheticTask, "short": SyntheticTask, "hidden": SyntheticTask,
            "star": StarTask, "constraints": TextTask, "rouge": TextTask}


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


def _imports(file: Path, package: str) -> list[str]:
    """The absolute names a module's file imports (``import a.b``; ``from .x import y`` gives ``pkg.x`` and
    ``pkg.x.y``, since ``y`` may be a module), anywhere in the file; none when it does not parse."""
    try:
        tree = ast.parse(file.read_text(), str(file))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                names.append(base)
            names += [f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*"]
    return names


def source_files(path: str) -> list[Path]:
    """The family's module file and, followed transitively, the files of the modules of its own top-level package that
    it imports (for a module outside any package: the ``.py`` files beside it that it imports) — not the standard
    library, roads or other installed packages."""
    module_name = path.partition(":")[0]
    first = _module_file(module_name)
    if first is None:
        return []
    top = module_name.split(".")[0]
    single = first.parent if "." not in module_name and first.name != "__init__.py" else None
    seen: dict[Path, None] = {}
    todo = [(module_name, first)]
    while todo:
        name, file = todo.pop()
        if file in seen or not file.is_file():
            continue
        seen[file] = None
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for other in _imports(file, package):
            if single is not None:  # a module outside a package: the sibling files it imports
                found = single / f"{other}.py" if "." not in other else None
                if found is not None and found.is_file() and found not in seen:
                    todo.append((other, found))
                continue
            if other.split(".")[0] != top:
                continue
            found = _module_file(other)
            if found is not None and found not in seen:
                todo.append((other, found))
    return sorted(seen)


def source_digest(path: str) -> str:
    """sha256 over the paths (relative to the family's top folder) and bytes of :func:`source_files`: what an edit to
    the family changes."""
    files = source_files(path)
    h = hashlib.sha256()
    if not files:
        return h.hexdigest()
    top = _module_file(path.partition(":")[0].split(".")[0])  # the folder holding its top package (or the module)
    root = files[0].parent if top is None else top.parent.parent if top.name == "__init__.py" else top.parent
    for file in files:
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
        h.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- the preflight's check

N_CHECK = 8  # prompts the preflight samples (each with a demonstration, a behaviour draw and the target)
PRESET_SPECIAL = ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")  # roads.models.SPECIAL's values (a test holds them equal)


def check_family(name: str, task, tokenizer=None, noises: tuple[float, ...] = (0.3, 0.5),
                 preset_vocab_size: int | None = None) -> None:
    """Build task ``name``'s family and try it on a handful of sampled (prompt, response) pairs: r* is a finite float
    (not a bool) in its ``reward_range`` on the target, on demonstrations at each of ``noises`` (the demonstrator and
    the behaviour policy) and on an empty response; the prompts are non-empty text, and the responses text whose
    non-space characters are the family's ``response_symbols``. Then the tokenizer: ``tokenizer`` (a transformers
    tokenizer: ``model.pretrained``'s), or with ``preset_vocab_size`` the byte-level BPE the SFT stage trains for a
    preset (:func:`preset_tokenizer`, on the sampled texts), must encode every prompt + response and decode it back
    unchanged, and — with ``response_vocab: task`` — write each response with tokens a policy restricted to the
    task's symbols may sample. Raises DataError with one line naming the task and, for a user family, its class."""
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
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DataError(f"{label}: reward_range must be two finite numbers, low < high, got {family.reward_range!r}")
    if family.gap_class not in GAP_CLASSES:
        raise DataError(f"{label}: gap_class must be one of {', '.join(map(repr, GAP_CLASSES))}, got "
                        f"{family.gap_class!r}")
    symbols = set(str(family.response_symbols))
    if not symbols - {" "}:
        raise DataError(f"{label}: response_symbols is empty: a policy restricted to the task could write nothing")
    rng = random.Random(0)
    texts: list[tuple[str, str, str]] = []  # (prompt, what, response) the tokenizer must handle
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
        if not isinstance(prompt, str) or not prompt.strip():
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
            texts.append((prompt, what, response))
    if tokenizer is None and preset_vocab_size is None:
        return
    if tokenizer is None:
        tokenizer = preset_tokenizer([p + r for p, _, r in texts], preset_vocab_size)
        which = f"the preset's byte-level BPE (model.vocab_size {preset_vocab_size})"
    else:
        named = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        which = f"the tokenizer of model.pretrained ({named})"
    restricted = getattr(task, "response_vocab", "task") == "task"
    allowed = symbols | {" "}
    for prompt, what, response in texts:
        text = prompt + response
        ids, back = _round_trip(tokenizer, text)
        if back != text:
            raise DataError(f"{label}: {which} cannot encode {what} {response!r} (after {prompt!r}): it decodes "
                            f"back as {back[len(prompt):] if back.startswith(prompt) else back!r}")
        if restricted and response:
            for token in _round_trip(tokenizer, response)[0]:
                piece = _token_text(tokenizer, token)
                if not piece or not set(piece) <= allowed:
                    raise DataError(f"{label}: {which} writes {what} {response!r} with the token {piece!r}, which a "
                                    "policy restricted to the task's response_symbols may not sample "
                                    f"(tasks.{name}.response_vocab: task)")


def preset_tokenizer(corpus: list[str], vocab_size: int):
    """The byte-level BPE of ``roads.models.build_tokenizer`` (what SFT trains for a preset), as a bare
    ``tokenizers.Tokenizer``: the same construction without importing transformers (the preflight stays fast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(PRESET_SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _round_trip(tokenizer, text: str) -> tuple[list[int], str]:
    """(token ids of ``text`` without special tokens, their decoding) for a transformers or a bare tokenizer."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # transformers
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ids, tokenizer.decode(ids, skip_special_tokens=False)


def _token_text(tokenizer, token: int) -> str:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.decode([token], clean_up_tokenization_spaces=False)
    return tokenizer.decode([token], skip_special_tokens=False)


def gap_class_of(family: str) -> str | None:
    """The ``gap_class`` of the family at ``family`` (a built-in name or a user path): the class's attribute, or —
    when it is computed per instance — that of the family built from its default ``Settings``; None when the class
    cannot be loaded or built (the report then leaves the task's class blank rather than fail)."""
    try:
        cls = family_class(family)
    except RoadsError:
        return None
    value = getattr(cls, "gap_class", None)
    if not isinstance(value, str):
        try:
            value = cls.from_settings(cls.Settings()).gap_class
        except Exception:  # noqa: BLE001 - the user's code; no default settings
            return None
    return value if value in GAP_CLASSES else None

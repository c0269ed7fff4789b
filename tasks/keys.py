"""Cache keys and cache records, without Prefect or MLflow (so a fully cached study is decided in a fraction of a
second, before any server or worker starts).

Cache key = stage name + stage VERSION + config fingerprint + input digests (+ a local pretrained model's contents)
(+ a user task family's source, :func:`_family_digest`) + the digest of the code the stage can reach: its module ``roads/stages/<stage>.py``, the runner every stage goes
through (``roads/runner.py``), and every library module either imports, followed transitively (imports inside
functions included) — not the whole library, and not the settings (``roads/config.py``, ``roads/settings.py``, the stage table: see
``NOT_CODE``). Editing the report's code reruns only ``report``; editing the sampler
reruns the stages that sample and what follows from their outputs. Found by reading the source, never by importing it, and computed once per process.

A record is Prefect's persisted result of the stage task (a JSON document whose ``result`` is the stage result as
JSON text) in ``$ROADS_HOME/results/<key>``; a record whose artifact folder is gone counts as absent.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import roads
from roads.artifacts import ArtifactRef, digest_dir, state_home
from roads.config import StageSpec

ROOT = Path(roads.__file__).resolve().parent  # the roads package
ENTRY_MODULES = ("roads.runner",)  # what every stage runs through besides its own module
# Modules whose effect on a result is already in the key another way, so an edit to them reruns nothing by itself:
# roads.config and roads.settings reach a stage as the values of its settings (the fingerprint holds every one,
# defaults and derived values included), the stage table as the inputs it names (their digests are in the key);
# their imports are not followed either. A method of a settings class that computes something a stage uses outside
# the fingerprinted values would escape this — keep such code in the stage's own modules.
NOT_CODE = ("roads.config", "roads.settings", "roads.stage_table")


@lru_cache(maxsize=None)
def _module_file(name: str, root: Path = ROOT) -> Path | None:
    """``roads.stages.sft`` -> roads/stages/sft.py (or a package's __init__.py); None outside the package."""
    parts = name.split(".")
    if parts[0] != "roads":
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(file: Path, root: Path = ROOT) -> str:
    rel = file.relative_to(root).with_suffix("")
    parts = ["roads", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_FROM = re.compile(r"^[ \t]*from[ \t]+([.\w]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n]+)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n]+)", re.M)


def _imports(file: Path, root: Path = ROOT) -> frozenset[str]:
    """The roads modules a file imports anywhere in its body (``from roads.x import y``: roads.x, and roads.x.y
    when y is a module), plus the packages above each (importing roads.a.b runs roads/a/__init__.py). Read with a
    regular expression over the lines (parsing every file was 30x slower); an import-like line inside a docstring
    only adds a file to the digest, never leaves one out."""
    name = _module_name(file, root)
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    return _scan(file.read_text(), package, root)


@lru_cache(maxsize=None)
def _scan(text: str, package: str, root: Path) -> frozenset[str]:
    found: set[str] = set()
    for match in _IMPORT.finditer(text):
        found.update(part.split()[0] for part in match[1].split("#")[0].split(",") if part.strip())
    for match in _FROM.finditer(text):
        module, names = match[1], match[2].split("#")[0].strip("() \n")
        if module.startswith("."):  # relative: from . import x / from ..data import y
            level = len(module) - len(module.lstrip("."))
            base = package.split(".")
            module = ".".join(base[: len(base) - (level - 1)] + ([module.lstrip(".")] if module.lstrip(".") else []))
        found.add(module)
        found.update(f"{module}.{part.split()[0]}" for part in names.replace("\n", ",").split(",") if part.strip())
    out = set()
    for module in found:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            if _module_file(".".join(parts[:i]), root) is not None:
                out.add(".".join(parts[:i]))
    return frozenset(out)


def code_files(stage: str, root: Path = ROOT) -> list[Path]:
    """Every library file the stage's result can depend on, sorted."""
    start = [f"roads.stages.{stage}", *ENTRY_MODULES]
    seen: set[str] = set()
    todo = [".".join(m.split(".")[:i]) for m in start for i in range(1, m.count(".") + 2)]  # with their packages
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        file = _module_file(module, root)
        if file is None or module in NOT_CODE:
            continue
        seen.add(module)
        todo.extend(_imports(file, root) - seen)
    return sorted(_module_file(m, root) for m in seen)


@lru_cache(maxsize=None)
def code_digest(stage: str, root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of ``code_files(stage)``; once per process."""
    h = hashlib.sha256()
    for file in code_files(stage, root):
        h.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def stage_version(stage: str) -> str:
    """The module's ``VERSION = N``, read from its source (importing a stage would import torch and TRL)."""
    file = _module_file(f"roads.stages.{stage}")
    if file is None:
        raise KeyError(stage)
    for node in ast.parse(file.read_bytes()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VERSION" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise ValueError(f"{file}: no VERSION")


@lru_cache(maxsize=16)
def _folder_digest(path: str, listing: tuple) -> str:
    return digest_dir(path)


def _listing(folder: Path) -> tuple:
    """(path, size, mtime) of every file: the folder is hashed again only when this changes."""
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()))


def _pretrained_digest(spec: StageSpec) -> list[str]:
    """A pretrained model in a local folder is an input like any other: its contents, not its path, count (hashed
    once per process while its files are unchanged: a 500 MB model takes seconds); a fetched model's short name
    counts by its folder's contents too."""
    from roads.fetch import resolve_pretrained

    pretrained = resolve_pretrained(spec.model.pretrained, must_exist=False) if spec.model and spec.model.pretrained \
        else None
    if pretrained and Path(pretrained).expanduser().is_dir():
        folder = Path(pretrained).expanduser().resolve()
        return [f"pretrained={_folder_digest(str(folder), _listing(folder))}"]
    if spec.model and spec.model.pretrained and Path(spec.model.pretrained).expanduser().is_file():  # a .gguf file
        file = Path(spec.model.pretrained).expanduser().resolve()
        stat = file.stat()
        return [f"pretrained={_file_digest(str(file), (stat.st_size, stat.st_mtime_ns))}"]
    return []


def _family_digest(spec: StageSpec) -> list[str]:
    """A user family (``tasks.<name>.family: package.module:Class``) is code like the library's: its source (the module
    and the modules of its own package it imports) counts in the key of the stage that reads the task
    (prepare_data), which writes the digest into its output, so every stage reading that data follows it."""
    from roads.data.family import is_path, source_digest

    if spec.task is not None and is_path(spec.task.family):
        return [f"family={source_digest(spec.task.family)}"]
    return []


@lru_cache(maxsize=16)
def _file_digest(path: str, listing: tuple) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(spec: StageSpec, inputs: dict[str, ArtifactRef]) -> str:
    parts = [
        spec.stage,
        stage_version(spec.stage),
        spec.fingerprint(),
        *(f"{name}={inputs[name].digest}" for name in sorted(inputs)),
        *_pretrained_digest(spec),
        *_family_digest(spec),
        code_digest(spec.stage),
    ]
    return f"{spec.stage}-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def results_dir() -> Path:
    return state_home() / "results"


def read_record(key: str) -> dict[str, Any] | None:
    """The stage result cached under ``key``, or None when there is none, it is unreadable, or its artifact folder is
    gone (then the record is removed, so Prefect reruns the stage rather than return a dangling path or garbage)."""
    record = results_dir() / key
    try:
        doc = json.loads(record.read_text())["result"]  # Prefect stores the JSON result as a string
        result = json.loads(doc) if isinstance(doc, str) else doc
        path = result["artifact"]["path"]
    except FileNotFoundError:
        return None
    except OSError:
        return None
    except (ValueError, KeyError, TypeError):  # not a record (records are written atomically): rerun the stage
        record.unlink(missing_ok=True)
        return None
    if not Path(path).is_dir():
        record.unlink(missing_ok=True)
        return None
    return result


def cached_results(nodes: list, force: set[str] = frozenset()) -> dict[str, dict]:
    """Node id -> cached result, for every node whose key can be computed now (its inputs are hits themselves) and
    whose record is there. ``nodes`` in topological order; ids in ``force`` count as misses."""
    results: dict[str, dict] = {}
    for node in nodes:
        if node.id in force or any(dep not in results for dep in node.inputs.values()):
            continue
        refs = {name: ArtifactRef.from_json(results[dep]["artifact"]) for name, dep in node.inputs.items()}
        result = read_record(cache_key(node.spec, refs))
        if result is not None:
            results[node.id] = result
    return results

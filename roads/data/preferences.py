"""Load real preference data as a plain list of ``{"prompt", "chosen", "rejected"}`` dicts.

``load_preferences(source)`` reads a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``,
``.parquet``) or, when ``source`` is not an existing path, a Hugging Face hub dataset by name
(``datasets.load_dataset(source, split=split)``). Every record comes back as three strings: the
prompt, and the chosen and rejected responses *without* the prompt in front of them, so that
``prompt + chosen`` is the full chosen text.

Formats (``format=``):

``"standard"``
    Columns ``prompt``, ``chosen``, ``rejected``. ``chosen``/``rejected`` may also be
    conversations (lists of ``{"role", "content"}`` messages, as in UltraFeedback-binarized): the
    response is then the content of the last ``assistant`` message. A conversational ``prompt`` is
    rendered as HH-RLHF text: ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"``.
``"hh-rlhf"``
    Only ``chosen`` and ``rejected``, each a whole transcript
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (Anthropic HH-RLHF). The prompt is the shared prefix up
    to and including the last ``"\\n\\nAssistant:"`` both transcripts share; the responses are what
    follows it, leading space kept (``" No, sorry!"``). See :func:`split_prompt_hh`.
``"tldr"``
    TL;DR summarization. Either the OpenAI summarize-from-feedback comparison layout
    ``{"info": {"post", "title", "subreddit"}, "summaries": [{"text"}, {"text"}], "choice": 0|1}``
    (a top-level ``prompt``, or ``post``/``title``/``subreddit``, may replace ``info``), whose prompt
    is built as ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"`` and whose
    chosen summary is ``summaries[choice]``; or the flat ``prompt``/``chosen``/``rejected`` layout.
``"auto"`` (default)
    Decided from the first record's keys: prompt+chosen+rejected -> standard; chosen+rejected
    only -> hh-rlhf; summaries+choice with info, prompt or post -> tldr.

Every problem is a :class:`roads.errors.DataError` with a one-line message naming the file (or
dataset), the record or line number and the column, and saying how to fix it.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from roads.errors import DataError

FORMATS: tuple[str, ...] = ("auto", "standard", "hh-rlhf", "tldr")
SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"

_ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
_FIX_HINT = "give prompt/chosen/rejected columns or pass format=" + "|".join(FORMATS[1:])


# --------------------------------------------------------------------------- public API


def load_preferences(
    source: str,
    *,
    format: str = "auto",
    split: str = "train",
    limit: int | None = None,
) -> list[dict]:
    """Load preference pairs from a local file or a hub dataset name.

    Args:
        source: a local ``.jsonl``/``.jsonl.gz``/``.json``/``.json.gz``/``.parquet`` path, or a
            Hugging Face hub dataset name (used only when no such local path exists).
        format: one of ``"auto"``, ``"standard"``, ``"hh-rlhf"``, ``"tldr"`` (see the module doc).
        split: the hub split to load; ignored for local files.
        limit: keep only the first ``limit`` records (``None`` keeps all).

    Returns:
        A list of ``{"prompt": str, "chosen": str, "rejected": str}`` dicts, responses without the
        prompt prefix.

    Raises:
        DataError: a missing/empty/malformed file, an unknown format, a missing column, or a hub
            dataset that could not be loaded.
    """
    source = str(source)
    if format not in FORMATS:
        raise DataError(
            f"{source}: unknown preference format {format!r}; valid formats are: {', '.join(FORMATS)}"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"{source}: limit must be a whole number >= 0 or None, got {limit!r}")

    path = Path(source).expanduser()
    if path.exists():
        where = source
        records: Iterable[dict] = _read_local(path, where)
    elif _looks_like_path(source):
        raise DataError(
            f"{source}: file not found; check the path (relative paths are from {os.getcwd()}) "
            f"or give a hub dataset name"
        )
    else:
        where = source
        records = _read_hub(source, split, limit)

    out: list[dict] = []
    if limit == 0:
        return out
    convert: Callable[[dict, str, int], dict] | None = None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: record {number} is a {type(record).__name__}, not an object with "
                f"columns; {_FIX_HINT}"
            )
        if convert is None:
            name = _detect_format(record, where, number) if format == "auto" else format
            convert = _CONVERTERS[name]
        out.append(convert(record, where, number))
        if limit is not None and len(out) >= limit:
            break  # stop before reading further lines
    if not out:
        raise DataError(f"{where}: no records found (empty file or split); give a file with at least one pair")
    return out


def split_prompt_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest shared prefix of ``chosen`` and ``rejected`` that ends with
    ``"\\n\\nAssistant:"`` (so earlier Assistant turns both share belong to the prompt); each
    response is the rest of its transcript, leading space kept. ``prompt + chosen_response == chosen``
    and ``prompt + rejected_response == rejected``.

    Raises:
        DataError: the two transcripts share no ``"\\n\\nAssistant:"`` turn to split at.
    """
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(
            f"chosen and rejected must be text transcripts, got {type(chosen).__name__} and "
            f"{type(rejected).__name__}; pass format=standard for conversational (message list) data"
        )
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        if ASSISTANT not in chosen or ASSISTANT not in rejected:
            missing = "chosen" if ASSISTANT not in chosen else "rejected"
            raise DataError(
                f"{missing} has no {ASSISTANT!r} turn, so the prompt cannot be split off; give "
                f"HH-RLHF transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') or pass format=standard"
            )
        raise DataError(
            f"chosen and rejected differ before their first shared {ASSISTANT!r} turn (the prompts "
            f"differ), so the prompt cannot be split off; give transcripts of the same conversation "
            f"or pass format=standard with a prompt column"
        )
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


# --------------------------------------------------------------------------- local files and hub


def _looks_like_path(source: str) -> bool:
    lowered = source.lower()
    if lowered.endswith(SUFFIXES) or lowered.endswith((".gz", ".csv", ".arrow", ".txt")):
        return True
    return source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in source


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def _read_local(path: Path, where: str) -> Iterator[dict]:
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if _suffix(p))
        hint = f" ({', '.join(files)})" if files else ""
        raise DataError(f"{where}: is a directory; give one data file in it{hint}")
    suffix = _suffix(path)
    if not suffix:
        raise DataError(
            f"{where}: unsupported file type; give a {', '.join(SUFFIXES)} file"
        )
    if suffix == ".parquet":
        return iter(_read_parquet(path, where))
    if suffix in (".json", ".json.gz"):
        return iter(_read_json(path, where))
    return _read_jsonl(path, where)


def _open_bytes(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _damaged(where: str, err: BaseException, after: int) -> DataError:
    """A file that ends early, is not gzip, or whose compressed data is corrupt: named, with where reading stopped."""
    place = f"after line {after}" if after else "at its start"
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
        what = "ended early" if isinstance(err, EOFError) else "has damaged compressed data"
        return DataError(f"{where}: {what} {place} ({_one_line(err)}); the .gz file is truncated or corrupt: "
                         f"copy or compress it again")
    return DataError(f"{where}: could not be read {place} ({_one_line(err)}); check the file is intact")


def _decode(raw: bytes, where: str, line_number: int) -> str:
    """UTF-8 text of one line (a BOM at the start of the file is dropped); a bad byte names the line and column."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = line_number + raw.count(b"\n", 0, err.start)
        raise DataError(
            f"{where}: line {line} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
            f"{err.start - line_start + 1}); save the file as UTF-8"
        ) from None
    return text[1:] if line_number == 1 and text.startswith("\ufeff") else text


_LOAD_ERRORS = (OSError, EOFError, zlib.error)


def _read_jsonl(path: Path, where: str) -> Iterator[dict]:
    line_number = 0
    try:
        with _open_bytes(path) as handle:
            for line_number, raw in enumerate(handle, start=1):
                line = _decode(raw, where, line_number)
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{where}: line {line_number} is not valid JSON ({err.msg} at column "
                        f"{err.colno}); fix or remove that line"
                    ) from None
    except _LOAD_ERRORS as err:
        raise _damaged(where, err, line_number) from None


def _read_json(path: Path, where: str) -> list[dict]:
    try:
        with _open_bytes(path) as handle:
            raw = handle.read()
    except _LOAD_ERRORS as err:
        raise _damaged(where, err, 0) from None
    text = _decode(raw, where, 1)
    if not text.strip():
        raise DataError(f"{where}: no records found (empty file); give a file with at least one pair")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines stored under a .json name
            return list(_read_jsonl(path, where))
        raise DataError(
            f"{where}: is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            f"give a JSON list of records or a JSON Lines file"
        ) from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1 and not {"chosen", "rejected", "summaries"} & data.keys():
            data = data[lists[0]]  # {"data": [...]}-style wrapper
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{where}: holds a JSON {type(data).__name__}; give a JSON list of records")
    return data


def _read_parquet(path: Path, where: str) -> list[dict]:
    try:
        import pandas as pd

        frame = pd.read_parquet(path)
    except ImportError as err:
        raise DataError(f"{where}: reading Parquet needs pandas and pyarrow ({_one_line(err)}); install them") from None
    except Exception as err:  # pyarrow raises its own error types for bad files
        raise DataError(f"{where}: could not be read as Parquet ({_one_line(err)}); check the file is intact") from None
    return [_plain(record) for record in frame.to_dict(orient="records")]


def _plain(value: Any) -> Any:
    """Turn the numpy arrays and scalars pandas gives for nested Parquet columns into Python values."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _read_hub(name: str, split: str, limit: int | None) -> Iterator[dict]:
    offline = offline_flag("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if offline:  # already offline: only a cached copy could have loaded
        fix = (f"{offline} is set (offline) and no copy of it is cached: give a local .jsonl/.json/.parquet file, "
               f"or load it once on a machine that can reach the hub")
    else:
        fix = (
            "the hub may be unreachable: set HF_HUB_OFFLINE=1 to use a cached copy, or download it and "
            "give a local .jsonl/.json/.parquet file"
        )
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{name}: could not load dataset (the 'datasets' package is missing: {_one_line(err)}); {fix}") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
    except Exception as err:  # network, missing dataset or split: all reported the same way
        raise DataError(
            f"{name}: could not load dataset (split {split!r}) from the Hugging Face hub "
            f"({type(err).__name__}: {_one_line(err)}); {fix}"
        ) from None
    return iter(dataset)


def offline_flag(*names: str) -> str | None:
    """``NAME=value`` of the first of the Hugging Face offline switches that is on (1/true/yes/on), else None."""
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={value}"
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else type(err).__name__


# --------------------------------------------------------------------------- formats


def _detect_format(record: dict, where: str, number: int) -> str:
    keys = set(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "standard"
    if {"chosen", "rejected"} <= keys:
        return "hh-rlhf"
    if {"summaries", "choice"} <= keys and keys & {"info", "prompt", "post"}:
        return "tldr"
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in keys]
    raise DataError(
        f"{where}: record {number} has no column {_names(missing)} (found: {_found(record)}), so "
        f"its format cannot be detected; {_FIX_HINT}"
    )


def _names(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns)


def _found(record: dict) -> str:
    return ", ".join(str(k) for k in record) or "no columns"


def _require(record: dict, columns: Iterable[str], where: str, number: int, fix: str) -> None:
    missing = [c for c in columns if c not in record or record[c] is None]
    if missing:
        raise DataError(
            f"{where}: record {number} has no column {_names(missing)} (found: {_found(record)}); {fix}"
        )


def _text(value: Any, column: str, where: str, number: int) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: record {number} column {column!r} is a {type(value).__name__}, not text; "
            f"give text or a list of {{'role', 'content'}} messages"
        )
    return value


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def _render_messages(messages: list[dict]) -> str:
    """Render a conversation as HH-RLHF text ending in ``"\\n\\nAssistant:"`` (ready for a reply)."""
    parts = []
    for message in messages:
        role = str(message.get("role", "user"))
        parts.append(f"\n\n{_ROLE_NAMES.get(role.lower(), role.capitalize())}: {message['content']}")
    return "".join(parts) + ASSISTANT


def _response(value: Any, column: str, where: str, number: int) -> str:
    if _is_messages(value):
        replies = [m for m in value if str(m.get("role", "")).lower() == "assistant"]
        if not replies:
            raise DataError(
                f"{where}: record {number} column {column!r} is a conversation with no 'assistant' "
                f"message; give the response as text or end the conversation with an assistant message"
            )
        return _text(replies[-1]["content"], column, where, number)
    return _text(value, column, where, number)


def _standard(record: dict, where: str, number: int) -> dict:
    _require(record, ("prompt", "chosen", "rejected"), where, number, _FIX_HINT)
    prompt = record["prompt"]
    if _is_messages(prompt):
        prompt = _render_messages(prompt)
    return {
        "prompt": _text(prompt, "prompt", where, number),
        "chosen": _response(record["chosen"], "chosen", where, number),
        "rejected": _response(record["rejected"], "rejected", where, number),
    }


def _hh_rlhf(record: dict, where: str, number: int) -> dict:
    _require(
        record, ("chosen", "rejected"), where, number,
        "give HH-RLHF chosen/rejected transcripts or pass format=standard|tldr",
    )
    chosen = _text(record["chosen"], "chosen", where, number)
    rejected = _text(record["rejected"], "rejected", where, number)
    try:
        prompt, chosen_response, rejected_response = split_prompt_hh(chosen, rejected)
    except DataError as err:
        raise DataError(f"{where}: record {number}: {err}") from None
    return {"prompt": prompt, "chosen": chosen_response, "rejected": rejected_response}


def _tldr_prompt(record: dict, where: str, number: int) -> str:
    if record.get("prompt") is not None:
        return _text(record["prompt"], "prompt", where, number)
    info = record.get("info")
    if info is None:
        info = record
    elif not isinstance(info, dict):
        raise DataError(
            f"{where}: record {number} column 'info' is a {type(info).__name__}, not an object; "
            f"give info as {{'post', 'title', 'subreddit'}}"
        )
    post = info.get("post") if info.get("post") is not None else info.get("article")
    if post is None:
        raise DataError(
            f"{where}: record {number} has no column 'info.post' (found in info: {_found(info)}); "
            f"give info.post/title/subreddit, a prompt column, or pass format=standard"
        )
    lines = []
    if info.get("subreddit"):
        lines.append(f"SUBREDDIT: r/{info['subreddit']}")
    if info.get("title"):
        lines.append(f"TITLE: {info['title']}")
    lines.append(f"POST: {_text(post, 'info.post', where, number)}")
    return "\n".join(lines) + "\nTL;DR:"


def _summary(summary: Any, index: int, where: str, number: int) -> str:
    text = summary.get("text") if isinstance(summary, dict) else summary
    return _text(text, f"summaries[{index}].text", where, number)


def _tldr(record: dict, where: str, number: int) -> dict:
    if "summaries" not in record and {"chosen", "rejected"} <= record.keys():
        return _standard(record, where, number)  # flat TL;DR preference layout
    _require(
        record, ("summaries", "choice"), where, number,
        "give info/summaries/choice (OpenAI comparisons) or prompt/chosen/rejected columns",
    )
    summaries, choice = record["summaries"], record["choice"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(
            f"{where}: record {number} column 'summaries' must be a list of two summaries, got "
            f"{len(summaries) if isinstance(summaries, list) else type(summaries).__name__}; give exactly two"
        )
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(
            f"{where}: record {number} column 'choice' must be 0 or 1 (the index of the preferred "
            f"summary), got {choice!r}"
        )
    choice = int(choice)
    return {
        "prompt": _tldr_prompt(record, where, number),
        "chosen": _summary(summaries[choice], choice, where, number),
        "rejected": _summary(summaries[1 - choice], 1 - choice, where, number),
    }


_CONVERTERS: dict[str, Callable[[dict, str, int], dict]] = {
    "standard": _standard,
    "hh-rlhf": _hh_rlhf,
    "tldr": _tldr,
}

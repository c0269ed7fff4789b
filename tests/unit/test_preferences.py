"""Tests for roads.data.preferences: real HH-RLHF file, standard/TL;DR layouts, auto-detection, errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from roads.data.preferences import load_preferences, split_prompt_hh
from roads.errors import DataError

HH_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf"
HH_FILE = HH_DIR / "harmless-base-test.jsonl.gz"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


STANDARD = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
    {"prompt": "Sky colour?", "chosen": " Blue", "rejected": " Green"},
]


# --------------------------------------------------------------------------- real HH-RLHF file


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"real HH-RLHF file not present at {HH_FILE}")
@pytest.mark.parametrize("fmt", ["auto", "hh-rlhf"])
def test_real_hh_rlhf_file_splits_and_reconstructs(fmt):
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle if line.strip()]
    pairs = load_preferences(str(HH_FILE), format=fmt)
    assert len(pairs) == len(raw) == 2312
    for pair, original in zip(pairs, raw):
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["prompt"].startswith("\n\nHuman:")
        assert pair["prompt"].endswith("\n\nAssistant:")
        assert pair["prompt"] + pair["chosen"] == original["chosen"]
        assert pair["prompt"] + pair["rejected"] == original["rejected"]
    first = pairs[0]
    assert first["chosen"].startswith(" No, sorry!")
    assert first["rejected"].startswith(" There are lots of funny things")


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"real HH-RLHF file not present at {HH_FILE}")
def test_real_hh_rlhf_file_limit():
    pairs = load_preferences(str(HH_FILE), limit=5)
    assert len(pairs) == 5
    assert pairs[0]["chosen"].startswith(" No, sorry!")


# --------------------------------------------------------------------------- split_prompt_hh


def test_split_prompt_hh_multi_turn_keeps_earlier_assistant_turns_in_prompt():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
    chosen = shared + " Why did the chicken cross the road?"
    rejected = shared + " No."
    prompt, chosen_response, rejected_response = split_prompt_hh(chosen, rejected)
    assert prompt == shared
    assert chosen_response == " Why did the chicken cross the road?"
    assert rejected_response == " No."


def test_split_prompt_hh_responses_with_shared_start_and_extra_turns():
    prompt_text = "\n\nHuman: Name a fruit\n\nAssistant:"
    chosen = prompt_text + " An apple."
    rejected = prompt_text + " An\n\nHuman: what?\n\nAssistant: orange"
    prompt, chosen_response, rejected_response = split_prompt_hh(chosen, rejected)
    assert prompt == prompt_text  # shared " An" does not move the split point
    assert chosen_response == " An apple."
    assert rejected_response == " An\n\nHuman: what?\n\nAssistant: orange"


def test_split_prompt_hh_identical_responses_are_kept():
    text = "\n\nHuman: Hi\n\nAssistant: Hello"
    assert split_prompt_hh(text, text) == ("\n\nHuman: Hi\n\nAssistant:", " Hello", " Hello")


def test_split_prompt_hh_errors():
    with pytest.raises(DataError, match="rejected has no"):
        split_prompt_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a and no reply")
    with pytest.raises(DataError, match="prompts differ"):
        split_prompt_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b")


# --------------------------------------------------------------------------- standard layout


def test_standard_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    assert load_preferences(str(path), format="standard") == STANDARD
    assert load_preferences(str(path)) == STANDARD  # auto-detected


def test_standard_jsonl_gz_and_blank_lines(tmp_path):
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(STANDARD[0]) + "\n\n" + json.dumps(STANDARD[1]) + "\n")
    assert load_preferences(str(path)) == STANDARD[:2]


def test_standard_json_list(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(STANDARD), encoding="utf-8")
    assert load_preferences(str(path)) == STANDARD


def test_standard_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(STANDARD).to_parquet(path)
    assert load_preferences(str(path)) == STANDARD
    assert load_preferences(path, limit=2) == STANDARD[:2]  # a Path works too


def test_conversational_standard_rows(tmp_path):
    record = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke"},
        ],
        "chosen": [
            {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "draft"},
            {"role": "assistant", "content": "Knock knock."},
        ],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    path = write_jsonl(tmp_path / "conv.jsonl", [record])
    (pair,) = load_preferences(str(path))
    assert pair == {
        "prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:",
        "chosen": "Knock knock.",
        "rejected": "No.",
    }


def test_conversational_rows_from_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    record = {
        "prompt": "Q?",
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No"}],
    }
    path = tmp_path / "conv.parquet"
    pd.DataFrame([record]).to_parquet(path)
    assert load_preferences(str(path)) == [{"prompt": "Q?", "chosen": "Yes", "rejected": "No"}]


def test_hh_rlhf_jsonl_auto(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + " Goodbye!", "rejected": shared + " No."}])
    assert load_preferences(str(path)) == [{"prompt": shared, "chosen": " Goodbye!", "rejected": " No."}]


# --------------------------------------------------------------------------- TL;DR


def tldr_record(choice: int) -> dict:
    return {
        "info": {"id": "t3_x", "post": "My cat ate my homework.", "title": "Help", "subreddit": "cats"},
        "summaries": [{"text": " cat ate homework", "policy": "a"}, {"text": " homework gone", "policy": "b"}],
        "choice": choice,
        "worker": "w1",
    }


TLDR_PROMPT = "SUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat ate my homework.\nTL;DR:"


@pytest.mark.parametrize("fmt", ["auto", "tldr"])
def test_tldr_comparison_layout_choice_0_and_1(tmp_path, fmt):
    path = write_jsonl(tmp_path / "comparisons.jsonl", [tldr_record(0), tldr_record(1)])
    pairs = load_preferences(str(path), format=fmt)
    assert pairs == [
        {"prompt": TLDR_PROMPT, "chosen": " cat ate homework", "rejected": " homework gone"},
        {"prompt": TLDR_PROMPT, "chosen": " homework gone", "rejected": " cat ate homework"},
    ]


def test_tldr_comparison_layout_from_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "comparisons.parquet"
    pd.DataFrame([tldr_record(1)]).to_parquet(path)
    assert load_preferences(str(path)) == [
        {"prompt": TLDR_PROMPT, "chosen": " homework gone", "rejected": " cat ate homework"}
    ]


def test_tldr_flat_layout_and_prompt_field(tmp_path):
    flat = {"prompt": TLDR_PROMPT, "chosen": " a", "rejected": " b"}
    with_prompt = {"prompt": TLDR_PROMPT, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 1}
    path = write_jsonl(tmp_path / "tldr.jsonl", [flat, with_prompt])
    assert load_preferences(str(path), format="tldr") == [
        {"prompt": TLDR_PROMPT, "chosen": " a", "rejected": " b"},
        {"prompt": TLDR_PROMPT, "chosen": " b", "rejected": " a"},
    ]


def test_tldr_bad_choice(tmp_path):
    record = tldr_record(0) | {"choice": 2}
    path = write_jsonl(tmp_path / "bad_choice.jsonl", [record])
    with pytest.raises(DataError, match=r"bad_choice\.jsonl: record 1 column 'choice' must be 0 or 1"):
        load_preferences(str(path))


def test_tldr_missing_post(tmp_path):
    record = tldr_record(0)
    del record["info"]["post"]
    path = write_jsonl(tmp_path / "no_post.jsonl", [record])
    with pytest.raises(DataError, match=r"no_post\.jsonl: record 1 has no column 'info\.post'"):
        load_preferences(str(path))


# --------------------------------------------------------------------------- limit


def test_limit_keeps_first_records(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    assert load_preferences(str(path), limit=2) == STANDARD[:2]
    assert load_preferences(str(path), limit=10) == STANDARD
    assert load_preferences(str(path), limit=0) == []


def test_limit_stops_before_later_bad_records(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n{not json\n", encoding="utf-8")
    assert load_preferences(str(path), limit=1) == STANDARD[:1]


def test_negative_limit(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    with pytest.raises(DataError, match="limit must be"):
        load_preferences(str(path), limit=-1)


# --------------------------------------------------------------------------- errors


def test_missing_column_standard(tmp_path):
    records = [STANDARD[0], STANDARD[1], {"prompt": "p", "chosen": "c"}]
    path = write_jsonl(tmp_path / "x.jsonl", records)
    with pytest.raises(
        DataError,
        match=r"x\.jsonl: record 3 has no column 'rejected' \(found: prompt, chosen\); give prompt/chosen/rejected",
    ) as info:
        load_preferences(str(path), format="standard")
    assert "\n" not in str(info.value)


def test_missing_column_hh_rlhf(tmp_path):
    path = write_jsonl(tmp_path / "hh_missing.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b"}])
    with pytest.raises(DataError, match=r"hh_missing\.jsonl: record 1 has no column 'rejected'"):
        load_preferences(str(path), format="hh-rlhf")


def test_auto_cannot_detect(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError,
        match=r"odd\.jsonl: record 1 has no column 'prompt', 'chosen', 'rejected' \(found: question, answer\).*format=",
    ):
        load_preferences(str(path))


def test_hh_rlhf_no_assistant_turn(tmp_path):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a, no reply"}
    path = write_jsonl(tmp_path / "hh_bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"hh_bad\.jsonl: record 2: rejected has no '\\n\\nAssistant:' turn") as info:
        load_preferences(str(path))
    assert "\n" not in str(info.value)


def test_hh_rlhf_prompts_differ(tmp_path):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"}
    path = write_jsonl(tmp_path / "hh_differ.jsonl", [bad])
    with pytest.raises(DataError, match=r"hh_differ\.jsonl: record 1: chosen and rejected differ"):
        load_preferences(str(path), format="hh-rlhf")


def test_conversation_without_assistant_message(tmp_path):
    record = {"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": " no"}
    path = write_jsonl(tmp_path / "conv_bad.jsonl", [record])
    with pytest.raises(DataError, match=r"conv_bad\.jsonl: record 1 column 'chosen' is a conversation with no 'assistant'"):
        load_preferences(str(path))


def test_non_text_column(tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": "q", "chosen": 3, "rejected": "r"}])
    with pytest.raises(DataError, match=r"num\.jsonl: record 1 column 'chosen' is a int, not text"):
        load_preferences(str(path))


def test_malformed_jsonl_line_number(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n" + json.dumps(STANDARD[1]) + "\n{\"prompt\": oops}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3 is not valid JSON"):
        load_preferences(str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.jsonl"
    with pytest.raises(DataError, match=re.escape(str(path)) + ": file not found"):
        load_preferences(str(path))


def test_missing_relative_file_is_not_a_hub_lookup():
    with pytest.raises(DataError, match=r"data/x\.jsonl: file not found"):
        load_preferences("data/x.jsonl")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records found"):
        load_preferences(str(path))
    blank = tmp_path / "blank.json"
    blank.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.json: no records found"):
        load_preferences(str(blank))


def test_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    with pytest.raises(DataError, match=r"unknown preference format 'ultra'.*auto, standard, hh-rlhf, tldr"):
        load_preferences(str(path), format="ultra")


def test_unsupported_suffix_and_directory(tmp_path):
    csv = tmp_path / "prefs.csv"
    csv.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs\.csv: unsupported file type"):
        load_preferences(str(csv))
    write_jsonl(tmp_path / "inside.jsonl", STANDARD)
    with pytest.raises(DataError, match=r"is a directory; give one data file in it \(inside\.jsonl\)"):
        load_preferences(str(tmp_path))


def test_library_does_not_import_prefect_or_mlflow():
    import roads.data.preferences as module

    source = Path(module.__file__).read_text(encoding="utf-8")
    assert "prefect" not in source
    assert "mlflow" not in source

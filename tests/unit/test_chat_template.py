"""Conversational real data goes through model.pretrained's chat template (tasks.<name>.chat_template: auto|plain);
synthetic prompts stay plain. The tokenizer is built locally and given a ChatML template (no download)."""

from __future__ import annotations

import json

import pytest

from roads.artifacts import read_jsonl
from roads.config import StageSpec
from roads.models import build_tokenizer
from roads.runner import execute
from roads.settings import ModelConfig, PrepareDataConfig, TaskConfig
from roads.stages.prepare_data import hh_messages

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = build_tokenizer(["Human: hello there Assistant: hi"])
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """HH-RLHF records, and chat-message records, on 6 prompts."""
    path = tmp_path_factory.mktemp("src") / "hh.jsonl"
    rows = []
    for i in range(6):
        head = f"\n\nHuman: question {i}?\n\nAssistant: first answer {i}\n\nHuman: and then?\n\nAssistant:"
        rows.append({"chosen": head + f" good {i}", "rejected": head + f" bad {i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(store, source, template, pretrained):
    task = TaskConfig(family="preferences", source=source, chat_template=template)
    cfg = PrepareDataConfig(n_sft=4, n_pairs=4, n_val_pairs=1, n_eval_prompts=1, n_sft_val=1, n_select_pairs=1)
    spec = StageSpec(stage="prepare_data", params=cfg.model_dump(), seed=0, task_name="hh", task=task,
                     model=ModelConfig(pretrained=pretrained) if pretrained else None)
    result = execute(spec, {}, store)
    return result, {n: read_jsonl(f"{result.artifact.path}/{n}.jsonl") for n in ("sft", "pairs_train", "eval_prompts")}


def test_hh_text_as_messages():
    assert hh_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]


def test_conversations_go_through_the_chat_template(tmp_path, source, tokenizer_dir):
    result, splits = prepare(tmp_path, source, "auto", tokenizer_dir)
    assert result.metrics["prepare_data/chat_template"] == 1.0
    pair = splits["pairs_train"][0]
    i = pair["chosen"].split()[-1]
    assert pair["prompt"] == (f"<|im_start|>user\nquestion {i}?<|im_end|>\n<|im_start|>assistant\nfirst answer {i}"
                              f"<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n")
    assert pair["chosen"] == f"good {i}" and pair["rejected"] == f"bad {i}"
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for s in splits.values() for r in s)
    assert all("Human:" not in r["prompt"] for s in splits.values() for r in s)


def test_template_plain_and_no_model_keep_plain_text(tmp_path, source, tokenizer_dir):
    for template, pretrained in (("plain", tokenizer_dir), ("auto", None)):
        result, splits = prepare(tmp_path / template, source, template, pretrained)
        assert result.metrics["prepare_data/chat_template"] == 0.0
        assert all(r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith("\n\nAssistant:")
                   for r in splits["pairs_train"])


def test_only_real_conversations_read_the_model(tmp_path, hh_file):
    """The study gives prepare_data the model only for real data with a pretrained model (its tokenizer's template
    then counts in the cache key); synthetic tasks never see it, and their fingerprints do not move."""
    from roads.config import load_study

    study = load_study("pipelines.yaml", "default", overrides=["model.pretrained=/some/model"])
    plain = load_study("pipelines.yaml", "default")
    name = study.spec.tasks[0]
    assert study.stage_spec("prepare_data", name, 0).model is None
    assert study.stage_spec("prepare_data", name, 0).fingerprint() == plain.stage_spec("prepare_data", name, 0).fingerprint()
    real = load_study("pipelines.yaml", "hh-rlhf-smoke", overrides=["model.pretrained=/some/model"])
    spec = real.stage_spec("prepare_data", real.spec.tasks[0], 0)
    assert spec.model is not None and spec.model.pretrained == "/some/model"
    off = load_study("pipelines.yaml", "hh-rlhf-smoke",
                     overrides=["model.pretrained=/some/model", f"tasks.{real.spec.tasks[0]}.chat_template=plain"])
    assert off.stage_spec("prepare_data", real.spec.tasks[0], 0).model is None

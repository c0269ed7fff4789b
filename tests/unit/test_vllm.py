"""vLLM for online generation, when installed on a GPU machine: without it, one clear error before anything is
trained or written; with it, vLLM's outputs become the same Completion records as roads' own sampler."""

import sys
import types

import pytest
import torch

from roads.config import StageSpec
from roads.settings import OnlineDpoConfig, OnlineRlConfig
from roads.errors import RoadsError
from roads.generation import encode, sample_vllm, vllm_problem
from roads.runner import execute
from roads.stages.online_rl import rl_config
from support import tiny_data, tiny_sft

needs_no_vllm = pytest.mark.skipif(vllm_problem() is None, reason="vLLM runs here: the missing-vLLM path is moot")


@needs_no_vllm
def test_online_dpo_with_the_vllm_engine_fails_in_one_line_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    data = tiny_data(store, n_pairs=8)
    sft = tiny_sft(store, data)
    params = OnlineDpoConfig(engine="vllm", k=2, verifier="gold").model_dump()
    spec = StageSpec(stage="online_dpo", params=params, seed=0, task_name="gap")
    with pytest.raises(RoadsError, match="engine vllm: vLLM (is not installed|needs a CUDA GPU).*or use the default"):
        execute(spec, {"data": data, "reference": sft, "start": sft}, store)
    assert not (store / "online_dpo").exists() or not any((store / "online_dpo").iterdir())


@needs_no_vllm
def test_online_rl_use_vllm_names_the_setting(tmp_path):
    with pytest.raises(RoadsError, match=r"online_rl.use_vllm: vLLM .*; or set online_rl.use_vllm=false"):
        rl_config(OnlineRlConfig(use_vllm=True), 0, str(tmp_path))
    assert not rl_config(OnlineRlConfig(), 0, str(tmp_path)).use_vllm


class _Engine:
    """Stands in for vllm.LLM where vLLM cannot run (no GPU here): replies with fixed token ids per prompt."""

    made = []

    def __init__(self, model, seed, gpu_memory_utilization, enforce_eager):
        self.args = {"model": model, "seed": seed, "gpu_memory_utilization": gpu_memory_utilization}
        _Engine.made.append(self)

    def generate(self, requests, params, use_tqdm):
        def out(ids, reason):
            return types.SimpleNamespace(token_ids=ids, finish_reason=reason)
        self.requests, self.params = requests, params
        return [types.SimpleNamespace(outputs=[out([65, 66, 2], "stop"), out([67, 68, 69], "length")][:params.n])
                for _ in requests]


def test_vllm_outputs_become_completions(tmp_path, monkeypatch):
    store = tmp_path / "store"
    sft = tiny_sft(store, tiny_data(store, n_pairs=4))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft.path)
    fake = types.ModuleType("vllm")
    fake.LLM = _Engine
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_problem() is None
    eos = tokenizer.eos_token_id
    groups = sample_vllm(sft.path, ["ab", "cd"], n=2, max_new_tokens=3, temperature=0.7, seed=5)
    engine = _Engine.made[-1]
    assert engine.args == {"model": sft.path, "seed": 5, "gpu_memory_utilization": 0.5}
    assert engine.requests == [{"prompt_token_ids": ids} for ids in encode(tokenizer, ["ab", "cd"])]
    assert (engine.params.n, engine.params.max_tokens, engine.params.temperature, engine.params.seed) == (2, 3, 0.7, 5)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    first, second = groups[0]
    assert first.finished and not second.finished
    assert first.ids == (65, 66, 2) and second.ids == (67, 68, 69)
    assert first.text == tokenizer.decode([65, 66] if eos == 2 else [65, 66, 2], skip_special_tokens=True)

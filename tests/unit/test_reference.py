"""Reference log-probs computed once per (reference, pairs) and shared (roads/reference.py): a second DPO run on the
same pairs and reference reads them from the store, and trains to exactly the weights it would have computed."""

from __future__ import annotations

import numpy as np
import pytest
from support import Recorder, differs, tiny_data, tiny_sft, weights

from roads.config import StageSpec
from roads.settings import OfflineDpoConfig
from roads.reference import store_dir
from roads.runner import execute


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    data = tiny_data(store, n_pairs=16)
    return store, data, tiny_sft(store, data)


def dpo(store, data, sft, **settings):
    recorder = Recorder()
    cfg = OfflineDpoConfig(batch_size=8, **settings)
    spec = StageSpec(stage="offline_dpo", params=cfg.model_dump(), seed=0)
    result = execute(spec, {"data": data, "sft": sft}, store, recorder)
    shared = [m["offline_dpo/ref_logps_shared"] for m, _ in recorder.logs if "offline_dpo/ref_logps_shared" in m]
    return result, shared


def test_a_second_dpo_run_on_the_same_pairs_reads_the_reference_logps_and_matches(start, tmp_path, monkeypatch):
    store, data, sft = start
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))
    first, shared_first = dpo(store, data, sft, epochs=1)
    assert shared_first == [0.0] and len(list(store_dir().glob("*.npz"))) == 1
    saved = np.load(next(store_dir().glob("*.npz")))
    assert saved["ref_chosen_logps"].shape == (16,) and np.isfinite(saved["ref_rejected_logps"]).all()
    # the compute control (more epochs) and another beta: the same reference on the same pairs, so shared
    second, shared_second = dpo(store, data, sft, epochs=2, beta=0.3)
    assert shared_second == [1.0] and len(list(store_dir().glob("*.npz"))) == 1
    # and bit for bit what computing them again gives (a fresh store)
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "fresh"))
    again, shared_again = dpo(store, data, sft, epochs=2, beta=0.3)
    assert shared_again == [0.0]
    assert not differs(weights(second.artifact.path), weights(again.artifact.path))
    assert differs(weights(first.artifact.path), weights(sft.path))  # it trained


def test_other_pairs_or_precompute_off_do_not_share(start, tmp_path, monkeypatch):
    store, data, sft = start
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))
    dpo(store, data, sft, epochs=1)
    _, shared = dpo(store, data, sft, epochs=1, pair_fraction=0.5)  # other pairs: computed, a second entry
    assert shared == [0.0] and len(list(store_dir().glob("*.npz"))) == 2
    _, shared = dpo(store, data, sft, epochs=1, precompute_ref=False)
    assert shared == [] and len(list(store_dir().glob("*.npz"))) == 2

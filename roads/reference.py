"""Reference log-probabilities computed once per (reference weights, tokenized pairs) and shared by every DPO run
that trains on the same pairs against the same reference — offline DPO and its compute control (more epochs),
reruns with another β or learning rate — through a content-addressed store, ``$ROADS_HOME/ref_logps/<key>.npz``.

TRL's ``precompute_ref_log_probs`` computes the reference's log-probs of every pair once, before training, instead
of once per training step (so once per epoch); its own cache lives beside the dataset's files, and an in-memory
dataset has none. This trainer keys the precomputed columns by TRL's hash of the reference weights, a hash of the
tokenized pairs and the batch size they were computed in (so a hit is the same numbers, bit for bit, as computing
them again), and writes them atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets
from trl import DPOTrainer

from roads.artifacts import state_home
from roads.training import LengthRuled

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def store_dir() -> Path:
    return state_home() / "ref_logps"


def _rows_digest(dataset: Dataset) -> str:
    rows = dataset[:]  # column -> list of values, in row order
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class SharedReferenceDPOTrainer(LengthRuled, DPOTrainer):
    """DPOTrainer whose precomputed reference log-probs come from (and go to) the shared store. ``ref_logps_shared``
    says, after construction, whether they came from it. Its pairs longer than max_length go through a
    ``length_rule`` (:class:`roads.training.LengthRule`) when one is given, before the reference's log-probs."""

    ref_logps_shared = False

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        key = hashlib.sha256(f"{self._precompute_model_hash}\n{_rows_digest(dataset)}\n{batch_size}".encode()).hexdigest()
        path = store_dir() / f"{key[:32]}.npz"
        if path.is_file():
            with np.load(path) as saved:
                columns = {c: saved[c] for c in COLUMNS}
            if len(columns[COLUMNS[0]]) == len(dataset):
                self.ref_logps_shared = True
                return concatenate_datasets([dataset, Dataset.from_dict(columns)], axis=1)
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.npz")
        values = out.select_columns(list(COLUMNS))[:]
        np.savez(tmp, **{c: np.asarray(values[c], dtype=np.float32) for c in COLUMNS})
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        return out

"""Stage outputs depend on the seed and inputs only — not on what the process did before (the SIGKILL-and-rerun
guarantee needs this: a rerun happens in other worker processes with other global RNG states)."""

from pathlib import Path

import torch

from roads.config import load_study
from roads.plan import build_plan
from roads.runner import execute

ROOT = Path(__file__).resolve().parents[2]


def test_every_stage_is_independent_of_the_global_rng(tmp_path):
    study = load_study(ROOT / "pipelines.yaml", "smoke", ["pipeline.tasks=[gap]", "prepare_data.n_sft=32",
                                                          "prepare_data.n_pairs=32"])
    digests = []
    for attempt, rng_state in enumerate((1, 12345)):
        torch.manual_seed(rng_state)  # a different global generator state each time
        results = {}
        for i, node in enumerate(build_plan(study)):
            torch.manual_seed(rng_state + i)  # what earlier tasks in a worker process left behind
            results[node.id] = execute(node.spec, {k: results[v].artifact for k, v in node.inputs.items()},
                                       tmp_path / f"store{attempt}")
        digests.append({node_id: r.artifact.digest for node_id, r in results.items()})
    assert digests[0] == digests[1]

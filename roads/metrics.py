"""Statistics shared by the report: the hierarchical percentile bootstrap (seeds, then prompts or pairs within a
seed) and per-group random streams."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

_CHUNK = 1 << 20  # bootstrap draws (replicates × seeds × prompts) held in memory at once



def bootstrap_interval(
    per_seed: Sequence[np.ndarray],
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and hierarchical-bootstrap percentile interval of a mean over seeds of means over prompts.

    ``per_seed`` holds one array per seed, shape ``(n_prompts_s,)`` or ``(n_prompts_s, n_metrics)``: the per-prompt
    values (already averaged over a prompt's samples). Each replicate draws the seeds with replacement and, inside
    each drawn seed, its prompts with replacement; all metrics share the draws. Returns ``(mean, lo, hi)``, each of
    shape ``(n_metrics,)`` — or 0-d arrays when the inputs were 1-d. Deterministic given ``rng`` (a seed or a
    ``numpy.random.Generator``).
    """
    if not per_seed:
        raise ValueError("bootstrap_interval needs at least one seed")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    squeeze = np.ndim(per_seed[0]) == 1
    arrays = [np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in per_seed]
    n_metrics = arrays[0].shape[1]
    if any(a.shape[1] != n_metrics for a in arrays) or any(len(a) == 0 for a in arrays):
        raise ValueError("every seed needs at least one prompt and the same number of metrics")

    point = np.mean([a.mean(axis=0) for a in arrays], axis=0)
    n_prompts = np.array([len(a) for a in arrays])
    offsets = np.concatenate([[0], np.cumsum(n_prompts)[:-1]])
    n_seeds, max_prompts, total = len(arrays), int(n_prompts.max()), int(n_prompts.sum())
    # metric-major, plus one zero column that the padding draws of seeds with fewer prompts point at
    table = np.concatenate([np.concatenate(arrays).T, np.zeros((n_metrics, 1))], axis=1)  # (M, total + 1)
    ragged = bool((n_prompts != max_prompts).any())

    seeds = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
    stats = np.empty((n_bootstrap, n_metrics))
    step = max(1, _CHUNK // (n_seeds * max_prompts))
    for start in range(0, n_bootstrap, step):
        chosen = seeds[start:start + step]  # (c, S) which seed fills each slot
        size = n_prompts[chosen][..., None]  # (c, S, 1)
        local = (rng.random((*chosen.shape, max_prompts)) * size).astype(np.int64)  # (c, S, P) prompts drawn
        index = offsets[chosen][..., None] + local
        if ragged:
            index = np.where(np.arange(max_prompts) < size, index, total)
        seed_means = np.take(table, index, axis=1).sum(axis=-1) / size[..., 0]  # (M, c, S)
        stats[start:start + step] = seed_means.mean(axis=-1).T
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha], axis=0)
    if squeeze:
        return point[0], lo[0], hi[0]
    return point, lo, hi


def group_rng(bootstrap_seed: int, *labels: str) -> np.random.Generator:
    return np.random.default_rng([bootstrap_seed, zlib.crc32("/".join(labels).encode())])

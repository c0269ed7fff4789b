"""Hand-written training losses: pure functions of tensors (no model, no tokenizer), tested against values worked
out by hand."""

from __future__ import annotations

from torch import Tensor
from torch.nn.functional import logsigmoid


def local_bt_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float) -> Tensor:
    """The local reward model's Bradley–Terry loss on summed log-probabilities:

        L = mean_i −log σ(β · (log π(y+_i | x_i) − log π(y−_i | x_i)))

    where ``chosen_logps`` and ``rejected_logps`` (shape (B,)) are Σ_t log π(y_t | x, y<t) over each completion's
    tokens. Reference-free: DPO's sigmoid loss without the reference policy's log-probabilities. Returns a scalar.
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                         f"{tuple(rejected_logps.shape)} differ in shape")
    return -logsigmoid(beta * (chosen_logps - rejected_logps)).mean()


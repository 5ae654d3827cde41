"""SPIN's pairwise loss (the paper's equation 4.7 with the logistic or hinge loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def spin_loss(policy_real: torch.Tensor, policy_generated: torch.Tensor, ref_real: torch.Tensor,
              ref_generated: torch.Tensor, beta: float, loss_type: str = "sigmoid"):
    """Per-pair SPIN loss and its argument t = beta * (log-ratio of the real answer - log-ratio of the generated).

    sigmoid: log(1 + exp(-t)) (= DPO's sigmoid loss, chosen = real, rejected = generated); hinge: max(0, 1 - t).
    """
    t = beta * ((policy_real - ref_real) - (policy_generated - ref_generated))
    if loss_type == "sigmoid":
        return -F.logsigmoid(t), t
    if loss_type == "hinge":
        return torch.relu(1 - t), t
    raise ValueError(f"loss_type must be sigmoid or hinge, got {loss_type!r}")


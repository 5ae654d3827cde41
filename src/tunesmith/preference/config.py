"""The loss keys a preference recipe's own part carries (DPO's and SPIN's), and their checks."""
from __future__ import annotations

import math

from tunesmith.errors import UserError
from tunesmith.preference.loss import LOSS_TYPES

LOSS_HELP = {
    "loss_type": "sigmoid (DPO), hinge (SLiC), ipo (IPO, per-token averaged as TRL), dpop (DPO-Positive), simpo "
                 "or orpo (both reference-free).",
    "label_smoothing": "sigmoid only: the chance a pair's preference is flipped (conservative DPO), in [0, 0.5).",
    "dpop_lambda": "dpop only: the weight of the penalty on the chosen answer losing likelihood (paper: 5 to 500).",
    "simpo_gamma": "simpo only: the target reward margin gamma (paper: around 0.5 to 1.5 with beta 2 to 2.5).",
}


def check_loss_keys(part, betas) -> None:
    """One-line errors for the loss keys of ``part`` (loss_type, label_smoothing, dpop_lambda, simpo_gamma) and the
    ``betas`` it uses."""
    if part.loss_type not in LOSS_TYPES:
        raise UserError(f"field 'loss_type' must be one of {', '.join(LOSS_TYPES)}, got {part.loss_type!r}")
    for beta in betas:
        if not (math.isfinite(beta) and beta > 0):
            raise UserError(f"field 'beta' must be a finite number > 0, got {beta}")
    eps = part.label_smoothing
    if not (math.isfinite(eps) and 0 <= eps < 0.5):
        raise UserError(f"field 'label_smoothing' must be in [0, 0.5), got {eps}")
    if eps and part.loss_type != "sigmoid":
        raise UserError(f"field 'label_smoothing' applies to loss_type sigmoid only, not {part.loss_type}")
    if not (math.isfinite(part.dpop_lambda) and part.dpop_lambda >= 0):
        raise UserError(f"field 'dpop_lambda' must be a finite number >= 0, got {part.dpop_lambda}")
    if not math.isfinite(part.simpo_gamma):
        raise UserError(f"field 'simpo_gamma' must be a finite number, got {part.simpo_gamma}")


def loss_settings(part, beta: float):
    from tunesmith.preference.loss import LossSettings

    return LossSettings(loss_type=part.loss_type, beta=beta, label_smoothing=part.label_smoothing,
                        dpop_lambda=part.dpop_lambda, simpo_gamma=part.simpo_gamma)

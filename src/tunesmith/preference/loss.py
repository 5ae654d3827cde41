"""The pairwise preference losses, as ../shared/design/PAPERS.md defines them, on summed answer log-probs.

With Δ(y) = log π_θ(y|x) − log π_ref(y|x) summed over the answer's tokens, w the chosen and l the rejected answer:

    sigmoid  −(1−ε)·log σ(z) − ε·log σ(−z),  z = β·(Δ_w − Δ_l)
             DPO (Rafailov et al. 2023); ε is label_smoothing (conservative DPO)
    hinge    max(0, 1 − β·(Δ_w − Δ_l))
             SLiC, as TRL defines it
    ipo      ((Δ_w/|y_w| − Δ_l/|y_l|) − 1/(2β))²
             IPO (Azar et al. 2023), Δ averaged per answer token as TRL does (its authors' normalised form)
    dpop     −log σ(β·(Δ_w − Δ_l − λ·max(0, log π_ref(y_w|x) − log π_θ(y_w|x))))
             DPO-Positive (Pal et al. 2024)
    simpo    −log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)
             SimPO (Meng et al. 2024), no reference
    orpo     −log π_θ(y_w|x)/|y_w| − β·log σ(log odds(y_w) − log odds(y_l))
             ORPO (Hong et al. 2024), no reference; odds(y) = P/(1−P) with P = exp(log π_θ(y|x)/|y|) the per-token
             geometric mean; β is the paper's λ

Rewards (what metrics.jsonl reports): β·Δ for the losses with a reference, β·log π_θ(y|x)/|y| for simpo and orpo.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "dpop", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PairLogps:
    """Summed answer log-probs of the chosen and rejected rows of B pairs, and their answer-token counts (all (B,))."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class LossSettings:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    dpop_lambda: float = 50.0
    simpo_gamma: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


def preference_loss(policy: PairLogps, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    s: LossSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward), each (B,). ``ref_*``: the reference's summed log-probs
    (ignored by the reference-free losses)."""
    beta = s.beta
    if s.loss_type in REFERENCE_FREE:
        avg_w = policy.chosen / policy.chosen_tokens.clamp(min=1)
        avg_l = policy.rejected / policy.rejected_tokens.clamp(min=1)
        r_w, r_l = beta * avg_w, beta * avg_l
        if s.loss_type == "simpo":
            return -F.logsigmoid(r_w - r_l - s.simpo_gamma), r_w.detach(), r_l.detach()
        # log odds = log P - log(1 - P); log1p(-exp(a)) is finite for a < 0 (an answer's mean log-prob)
        log_odds = (avg_w - avg_l) - (torch.log1p(-torch.exp(avg_w)) - torch.log1p(-torch.exp(avg_l)))
        return -avg_w - beta * F.logsigmoid(log_odds), r_w.detach(), r_l.detach()
    ref_chosen, ref_rejected = ref_chosen.to(policy.chosen.dtype), ref_rejected.to(policy.rejected.dtype)
    d_w, d_l = policy.chosen - ref_chosen, policy.rejected - ref_rejected
    r_w, r_l = (beta * d_w).detach(), (beta * d_l).detach()
    if s.loss_type == "sigmoid":
        z = beta * (d_w - d_l)
        eps = s.label_smoothing
        loss = -F.logsigmoid(z) if eps == 0 else -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif s.loss_type == "hinge":
        loss = torch.relu(1 - beta * (d_w - d_l))
    elif s.loss_type == "ipo":
        avg = d_w / policy.chosen_tokens.clamp(min=1) - d_l / policy.rejected_tokens.clamp(min=1)
        loss = (avg - 1 / (2 * beta)) ** 2
    elif s.loss_type == "dpop":
        penalty = torch.clamp(ref_chosen - policy.chosen, min=0)
        loss = -F.logsigmoid(beta * (d_w - d_l - s.dpop_lambda * penalty))
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {s.loss_type!r}")
    return loss, r_w, r_l

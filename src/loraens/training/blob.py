"""BLoB (Wang, Shi, Han, Metaxas, Wang, NeurIPS 2024): variational LoRA by backpropagation.

Each member's A is a Gaussian, A = μ + Ω ⊙ E with E ~ N(0, I) and Ω = G² (G trained, started
in [ε/√2, ε]); B stays a point estimate. A training step takes one weight draw per member and
pass (decorrelated across tokens by flipout, :meth:`EnsembleLoRALinear._flipout_noise`), steps
AdamW on the batch's NLL, then steps SGD at ``blob.kl_lr`` on π_i · KL(q(A) ‖ N(0, σ_p²)),
as BLoB's code does: π_i = 1/N for the N steps of an epoch, or 2^i / (2^(N+1) − 1) with
``blob.kl_reweighting``. Members never mix: the KL is a sum of per-member terms.

At test time a member's predictive is the mean of ``blob.eval_samples`` draws' probabilities,
every member's draws as rows of one stacked pass
(:func:`loraens.evaluation.inference.score_variational`), or its mean weights alone.
"""

from __future__ import annotations

import numpy as np
import torch

from loraens.config import BlobConfig
from loraens.models.lora import LoRAEnsemble


class KLStep:
    """The KL's own optimiser step, taken after each NLL step."""

    def __init__(self, ensemble: LoRAEnsemble, cfg: BlobConfig, steps_per_epoch: int):
        self.ensemble = ensemble
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        params = ensemble.lora_parameters("A") + ensemble.lora_parameters("G")
        # foreach=False: the per-member update order must not depend on M (see optim.py).
        self.optimizer = torch.optim.SGD(params, lr=cfg.kl_lr, foreach=False)

    def weight(self, step: int) -> float:
        """π of the epoch's ``step`` (0-based)."""
        n = self.steps_per_epoch
        if not self.cfg.kl_reweighting:
            return 1.0 / n
        return 2.0 ** (step + 1) / (2.0 ** (n + 1) - 1)

    def __call__(self, step: int) -> np.ndarray:
        """Step on π · KL of every member; returns each member's KL before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        kl = self.ensemble.variational_kl(self.cfg.prior_sigma)
        (self.weight(step) * kl.sum()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return kl.detach().cpu().numpy()

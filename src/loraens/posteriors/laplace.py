"""Laplace-LoRA (Yang et al., ICLR 2024): a Gaussian posterior over each member's LoRA weights.

Around the trained weights θ* the posterior precision is the K-FAC curvature of the training
loss plus an isotropic prior's, H + τ I. For one weight with eigenpairs (Q_g, λ_g), (Q_a, λ_a)
(:class:`~loraens.posteriors.kfac.KronEigen`) the precision is diagonal in the rotated basis
Q_gᵀ W Q_a: λ_g,i λ_a,j + τ on the kept directions, τ on every other. Hence, per member:

- the Laplace evidence as a function of τ (MacKay; Immer et al. 2021), up to a constant:
  log Z(τ) = −τ/2 ‖θ*‖² + n/2 log τ − ½ Σ log(λ + τ), over the n kept curvatures λ (the
  discarded directions' log τ terms cancel against the prior's normaliser);
- the covariance of the K option logits under the linearised model, J Σ Jᵀ with
  Σ = (H + τ I)⁻¹: Σ_W ⟨Ĵ_k ⊙ Ĵ_l, 1/(λ+τ) − 1/τ⟩ + ⟨J_k, J_l⟩/τ, Ĵ = Q_gᵀ J Q_a;
- weight draws θ* + Σ^½ ε, exact for the same Σ.

A mixture over M members (one Laplace approximation per member, averaged like the ensemble) is
the same per member: every tensor here has the members on its first axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from loraens.posteriors.kfac import KronEigen

LOG10_TAU_RANGE = (-6.0, 6.0)
"""Prior precisions searched, as log10 τ (the marginal likelihood and the held-out grid)."""


@dataclass
class LaplacePosterior:
    """Every member's K-FAC Laplace posterior around its trained LoRA weights."""

    factors: dict[str, KronEigen]  # keyed as LoRAEnsemble.stacked_adapters
    map_norm2: torch.Tensor  # (members,) ‖θ*‖² over every LoRA weight
    prior_precision: torch.Tensor  # (members,) τ

    @property
    def n_members(self) -> int:
        return int(self.map_norm2.shape[0])

    def log_evidence(self, tau: torch.Tensor) -> torch.Tensor:
        """(len(tau), members): log Z(τ) up to a constant, at every τ of ``tau`` (float64)."""
        tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1, 1)
        total = -0.5 * tau * self.map_norm2.double()[None, :]
        for eig in self.factors.values():
            lam = eig.curvature.double().flatten(1)  # (members, n)
            total = total + 0.5 * lam.shape[1] * torch.log(tau)
            total = total - 0.5 * torch.log(lam[None, :, :] + tau[:, :, None]).sum(-1)
        return total

    def fit_prior_by_evidence(self) -> torch.Tensor:
        """Each member's τ maximising :meth:`log_evidence` (bounded over
        :data:`LOG10_TAU_RANGE`); sets and returns ``prior_precision``."""
        chosen = []
        for member in range(self.n_members):

            def negative(log10_tau: float, m: int = member) -> float:
                return -float(self.log_evidence(torch.tensor([10.0**log10_tau]))[0, m])

            best = minimize_scalar(negative, bounds=LOG10_TAU_RANGE, method="bounded")
            chosen.append(10.0 ** float(best.x))
        self.prior_precision = torch.tensor(chosen, dtype=torch.float64)
        return self.prior_precision

    def logit_covariance(
        self, jacobians: dict[str, torch.Tensor], tau: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Covariance of the option logits under the linearised model, (τs, members,
        questions, K, K), from each weight's per-question Jacobians (members, questions, K, out,
        in) keyed as :attr:`factors`; ``tau`` (τs, members) defaults to the fitted prior."""
        tau = self.prior_precision[None, :] if tau is None else torch.as_tensor(tau)
        tau = tau.double()
        total: torch.Tensor | None = None
        for key, eig in self.factors.items():
            members, questions, k = jacobians[key].shape[:3]
            # (members, questions, K, every kept direction): the sums below are matmuls, which
            # run several times faster than one three-operand einsum.
            rotated = _rotate(jacobians[key], eig).reshape(members, questions, k, -1)
            jac = jacobians[key].double().reshape(members, questions, k, -1)
            lam = eig.curvature.double().reshape(members, -1)  # (members, k_g · k_a)
            t = tau[:, :, None]
            weight = 1.0 / (lam[None] + t) - 1.0 / t  # (τs, members, k_g · k_a)
            weighted = rotated[None] * weight[:, :, None, None, :]
            kept = weighted @ rotated.transpose(-1, -2)[None]  # (τs, members, questions, K, K)
            gram = jac @ jac.transpose(-1, -2)
            part = kept + gram[None] / tau[:, :, None, None, None]
            total = part if total is None else total + part
        assert total is not None, "a posterior has at least one weight"
        return total

    def weight_draws(
        self, adapters: dict[str, torch.Tensor], samples: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``samples`` draws of every member's weights, as (members · samples, …) tensors in
        member-major order (member m's draws are rows m·S … m·S + S − 1)."""
        tau = self.prior_precision.double()
        drawn = {}
        for key in sorted(self.factors):  # the same noise per weight however they were stored
            eig = self.factors[key]
            mean = adapters[key].double()  # (members, out, in)
            noise = torch.randn((samples, *mean.shape), generator=generator, dtype=torch.float64)
            noise = noise.transpose(0, 1)  # (members, samples, out, in)
            q_g, q_a = eig.grad_vecs.double(), eig.act_vecs.double()
            rotated = torch.einsum("mog,msoi,mia->msga", q_g, noise, q_a)
            lam = eig.curvature.double()
            t = tau[:, None, None]
            scale = (1.0 / torch.sqrt(lam + t) - 1.0 / torch.sqrt(t))[:, None]
            kept = torch.einsum("mog,msga,mia->msoi", q_g, rotated * scale, q_a)
            delta = noise / torch.sqrt(t)[:, None] + kept
            draws = mean[:, None] + delta
            drawn[key] = draws.reshape(-1, *mean.shape[1:]).float()
        return drawn


def _rotate(jac: torch.Tensor, eig: KronEigen) -> torch.Tensor:
    """Q_gᵀ J Q_a of every member's per-question, per-logit Jacobians (members, questions, K,
    out, in) -> (members, questions, K, k_g, k_a), in float64 as two large matmuls per member
    (a three-operand einsum took several times as long). Not float32: with a small prior
    precision the covariance is a small difference of large terms (ΣJJᵀ/τ less the kept
    directions' share), and float32 rotations then move the predictive visibly."""
    members, questions, k, out, inp = jac.shape
    rows = questions * k
    jac = jac.double()
    q_g = eig.grad_vecs.double().transpose(1, 2)  # (members, k_g, out)
    q_a = eig.act_vecs.double()  # (members, in, k_a)
    # Two large matmuls per member (a broadcast matmul over the rows is several times slower).
    by_out = jac.reshape(members, rows, out, inp).transpose(1, 2).reshape(members, out, -1)
    left = torch.bmm(q_g, by_out)  # (members, k_g, rows · in)
    left = left.reshape(members, -1, rows, inp).transpose(1, 2).reshape(members, -1, inp)
    rotated = torch.bmm(left, q_a)  # (members, rows · k_g, k_a)
    return rotated.reshape(members, questions, k, q_g.shape[1], q_a.shape[2])


def map_norms(adapters: dict[str, torch.Tensor]) -> torch.Tensor:
    """(members,) ‖θ*‖² of every member over all its LoRA weights."""
    return sum(t.double().flatten(1).pow(2).sum(1) for t in adapters.values())  # type: ignore[return-value]


def tau_grid(points_per_decade: int = 2) -> np.ndarray:
    """Prior precisions of the held-out search: log-spaced over :data:`LOG10_TAU_RANGE`."""
    low, high = LOG10_TAU_RANGE
    return np.logspace(low, high, int(round((high - low) * points_per_decade)) + 1)

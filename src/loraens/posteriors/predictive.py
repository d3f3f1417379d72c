"""Predictive distributions of a weight posterior, for every member, in stacked passes.

- **Linearised** (Laplace-LoRA's): the option logits are Gaussian, mean f(x; θ*) and covariance
  J Σ Jᵀ; their softmax is averaged by Monte Carlo over logit draws (the same standard-normal
  draws for every question, so a question's answer never depends on its batch) or approximated
  by the probit rule p ∝ softmax(f_k / √(1 + π/8 Σ_kk)). The Jacobian of K logits costs K
  backward passes per batch of questions, on top of one forward.
- **Sampled**: S weight draws of each of M members are M·S members of one stacked pass
  (:meth:`~loraens.models.lora.LoRAEnsemble.adapters`); each member's predictive is the mean of
  its S draws' probabilities. Forward passes only, with S times the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from loraens.data.prompts import EncodedQuestions
from loraens.models.loading import parameters_held_in
from loraens.models.lora import LoRAEnsemble
from loraens.posteriors.passes import GradTap, question_batches, stacked_pass
from loraens.runtime import Runtime

Link = Literal["mc", "probit"]
LOGIT_DRAWS = 2000
"""Logit draws of the Monte-Carlo link (the K-dimensional Gaussian is cheap to sample)."""


def gaussian_softmax_log_probs(
    mean: torch.Tensor, cov: torch.Tensor, n_choices: np.ndarray, link: Link, draws: torch.Tensor
) -> torch.Tensor:
    """log E[softmax(f)] for f ~ N(mean, cov), over each question's own options.

    ``mean`` (…, questions, K), ``cov`` (…, questions, K, K), ``draws`` (D, K) standard normal;
    options a question lacks get -inf."""
    k = mean.shape[-1]
    absent = torch.as_tensor(np.arange(k)[None, :] >= n_choices[:, None])
    mean = mean.double().masked_fill(absent, float("-inf"))
    cov = cov.double()
    if link == "probit":
        var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp(min=0)
        return torch.log_softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
    # A square root through eigh: covariances of absent options are 0, so not positive definite.
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs * vals.clamp(min=0).sqrt()[..., None, :]
    logits = mean[..., None, :] + torch.einsum("...kj,dj->...dk", root, draws.double())
    probs = torch.softmax(logits, dim=-1).mean(-2)
    return torch.log(probs)


def logit_draws(k: int, seed: int = 0) -> torch.Tensor:
    """(LOGIT_DRAWS, k) standard-normal draws of the Monte-Carlo link."""
    return torch.randn((LOGIT_DRAWS, k), generator=torch.Generator().manual_seed(seed))


class _JacobianTap:
    """Per-question Jacobians of the logit being differentiated, per weight and member."""

    def __init__(self, questions: int):
        self.questions = questions
        self.current: dict[str, torch.Tensor] = {}

    def __call__(self, layer: str, which: str, inputs: torch.Tensor, grads: torch.Tensor):
        members = inputs.shape[0]
        a = inputs.reshape(members, self.questions, -1, inputs.shape[-1])
        g = grads.reshape(members, self.questions, -1, grads.shape[-1])
        self.current[f"{layer}.lora_{which}"] = torch.einsum("mbwo,mbwi->mboi", g, a)


def linearised_moments(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    batch: np.ndarray,
    label_ids: torch.Tensor,
    runtime: Runtime,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """For one batch: the option logits (members, questions, K), every weight's Jacobians
    (members, questions, K, out, in), and the questions and their option counts in row order."""
    tap = _JacobianTap(len(batch))
    jacobians: dict[str, list[torch.Tensor]] = {}
    with ensemble.probed(GradTap(tap)):
        out = stacked_pass(ensemble, encoded, batch, label_ids, runtime)
        k_max = out.logits.shape[-1]
        for k in range(k_max):
            tap.current = {}
            # Rows never attend to each other: the gradient of the sum of every row's logit k
            # holds each question's own Jacobian at its own tokens.
            out.logits[..., k].sum().backward(retain_graph=k < k_max - 1)
            for key, jac in tap.current.items():
                jacobians.setdefault(key, []).append(jac)
    stacked = {key: torch.stack(parts, dim=2) for key, parts in jacobians.items()}
    return out.logits.detach(), stacked, out.questions, out.n_choices


def linearised_log_probs(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    label_ids: torch.Tensor,
    runtime: Runtime,
    covariance: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    link: Link = "mc",
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "laplace",
) -> np.ndarray:
    """(τs, members, questions, K) log-probs of the linearised predictive; ``covariance`` maps
    a batch's Jacobians to (τs, members, questions, K, K) logit covariances."""
    n, k_max = len(encoded), max(encoded.n_choices)
    out: np.ndarray | None = None
    draws = logit_draws(k_max)
    model = ensemble.model
    was_training = model.training
    model.eval()
    held = ensemble.base_parameters() if runtime.autocast_dtype is None else []
    try:
        # Jacobians need autograd even when the caller scores under inference mode or no_grad.
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            parameters_held_in(held, torch.float32),
        ):
            for batch in tqdm(
                question_batches(encoded, batch_size), desc=desc, disable=not progress
            ):
                mean, jac, questions, n_choices = linearised_moments(
                    ensemble, encoded, batch, label_ids, runtime
                )
                cov = covariance(jac)  # (τs, members, b, K, K)
                lp = gaussian_softmax_log_probs(mean[None].cpu(), cov.cpu(), n_choices, link, draws)
                if out is None:
                    out = np.full((lp.shape[0], lp.shape[1], n, k_max), -np.inf)
                out[:, :, questions] = lp.numpy()
    finally:
        ensemble.zero_grad(set_to_none=True)
        model.train(was_training)
    assert out is not None, "an empty question set has no predictive"
    return out

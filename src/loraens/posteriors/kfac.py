"""K-FAC factors of every LoRA weight of every member: the curvature Laplace-LoRA builds on.

Each adapted projection holds two weights per member, A (r × in) and B (out × r). For a weight
W with input a and output gradient g at a token, the gradient of a question's loss is
Σ_t g_t a_tᵀ, and the generalised Gauss-Newton of the summed loss over N questions is
approximated by a Kronecker product (K-FAC, in its "expand" form for sequences, Eschenhagen et
al. 2023):

    H_W ≈ Ā ⊗ G,   Ā = Σ_{n,t} a aᵀ / T,   G = Σ_{n,t} g gᵀ

with T the number of (non-padding) tokens seen and the gradients those of -log p(y_n | x_n)
for y_n drawn from the model's own predictive over the K options (the true Fisher, the
default) or the true labels (the empirical Fisher). With one scored position per question and
T = N this is the usual K-FAC of the summed loss. A's input is the layer's input x; B's input
is the scaled low-rank code (α/r)·A x, so the factors describe the weights as stored.

Large factors (Laplace-LoRA on a 7B model: 4096 × 4096 per layer and member) are kept as their
top eigenpairs only, as bayesian_lora keeps n_kfac = 10 directions; the discarded directions
carry the prior's precision alone (see :mod:`loraens.posteriors.laplace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from loraens.data.prompts import EncodedQuestions
from loraens.models.lora import LoRAEnsemble
from loraens.posteriors.passes import GradTap, masked_logits, question_batches, stacked_pass
from loraens.runtime import Runtime

FisherLabels = Literal["sampled", "true"]


@dataclass
class KronEigen:
    """One weight's K-FAC factors for every member, as eigenpairs (largest first): H ≈
    (Q_a diag λ_a Q_aᵀ) ⊗ (Q_g diag λ_g Q_gᵀ) on the (out, in) weight, so its curvature in the
    rotated basis Q_gᵀ W Q_a is λ_g λ_aᵀ, and 0 outside the kept directions."""

    act_vecs: torch.Tensor  # (members, in, k_a)
    act_vals: torch.Tensor  # (members, k_a)
    grad_vecs: torch.Tensor  # (members, out, k_g)
    grad_vals: torch.Tensor  # (members, k_g)

    @property
    def curvature(self) -> torch.Tensor:
        """(members, k_g, k_a): the eigenvalues of H in the kept block."""
        return self.grad_vals[:, :, None] * self.act_vals[:, None, :]


def top_eigenpairs(factor: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (…, d, k) and eigenvalues (…, k) of symmetric PSD ``factor`` (…, d, d),
    largest first, the ``keep`` largest when given; round-off negatives clipped to 0."""
    vals, vecs = torch.linalg.eigh(factor.double())
    vals, vecs = vals.flip(-1).clamp(min=0), vecs.flip(-1)
    if keep is not None and keep < vals.shape[-1]:
        vals, vecs = vals[..., :keep], vecs[..., :keep]
    return vecs.float(), vals.float()


class _Accumulator:
    """Sums of a aᵀ and g gᵀ per weight and member over the non-padding tokens of a pass."""

    def __init__(self) -> None:
        self.act: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}
        self.valid = torch.zeros(0, dtype=torch.bool)  # (rows · width,) of the current pass

    def __call__(self, layer: str, which: str, inputs: torch.Tensor, grads: torch.Tensor):
        key = f"{layer}.lora_{which}"
        a = inputs[:, self.valid].double()  # (members, tokens, in)
        g = grads[:, self.valid].double()  # (members, tokens, out)
        act, grad = a.transpose(1, 2) @ a, g.transpose(1, 2) @ g
        self.act[key] = self.act[key] + act if key in self.act else act
        self.grad[key] = self.grad[key] + grad if key in self.grad else grad


def fisher_targets(
    logits: torch.Tensor, labels: torch.Tensor, mode: FisherLabels, generator: torch.Generator
) -> torch.Tensor:
    """(members, questions) labels of the Fisher's loss: drawn from each member's own
    predictive over the options (true Fisher) or the questions' answers (empirical)."""
    if mode == "true":
        return labels.expand(logits.shape[:2])
    probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1])
    drawn = torch.multinomial(probs.cpu(), 1, generator=generator)
    return drawn.view(logits.shape[:2]).to(logits.device)


def kfac_factors(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    label_ids: torch.Tensor,
    runtime: Runtime,
    *,
    labels: FisherLabels = "sampled",
    seed: int = 0,
    batch_size: int = 8,
    keep: int | None = None,
    full_up_to: int = 1024,
) -> dict[str, KronEigen]:
    """The K-FAC eigenpairs of every LoRA weight (keys as ``stacked_adapters``), every member,
    from the questions of ``encoded``. Factors wider than ``full_up_to`` keep their ``keep``
    largest eigenpairs (all of them when ``keep`` is None)."""
    generator = torch.Generator().manual_seed(seed)
    sums = _Accumulator()
    tokens = 0
    model = ensemble.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), ensemble.probed(GradTap(sums)):
            for batch in question_batches(encoded, batch_size):
                model.zero_grad(set_to_none=True)
                out = stacked_pass(ensemble, encoded, batch, label_ids, runtime)
                logits = masked_logits(out.logits, out.n_choices)
                answers = torch.as_tensor([encoded.labels[i] for i in out.questions])
                y = fisher_targets(logits, answers.to(logits.device), labels, generator)
                sums.valid = out.valid.reshape(-1)
                flat = logits.reshape(-1, logits.shape[-1])
                F.cross_entropy(flat, y.reshape(-1), reduction="sum").backward()
                tokens += int(out.valid.sum())
    finally:
        ensemble.zero_grad(set_to_none=True)
        model.train(was_training)
    result = {}
    for key in sums.act:
        act, grad = sums.act[key] / tokens, sums.grad[key]
        keep_act = keep if act.shape[-1] > full_up_to else None
        keep_grad = keep if grad.shape[-1] > full_up_to else None
        result[key] = KronEigen(*top_eigenpairs(act, keep_act), *top_eigenpairs(grad, keep_grad))
    return result

"""TFB, training-free Bayesianisation of LoRA (Shi et al. 2025; bayesian-peft's ``tfblora``).

Each member's adapter is rotated so that B's columns are its singular directions: with
B = U diag(s) Vᵀ, B' = U diag(s) and A' = Vᵀ A (so B'A' = BA). A' gets a Gaussian whose
standard deviation on row i is σ / s_i, so the update B'(A' + E) carries isotropic noise of
scale σ inside B's column space. σ is the largest value whose predictive on an anchor set stays
within a tolerance of the trained adapter's, found by bisection; every member gets its own.

The criterion is bayesian-peft's: the NLL of the S-draw predictive against the trained
adapter's own predicted answers (so the anchor questions need no labels), as the relative
change |NLL_σ − NLL_0| / NLL_0 divided by the number of anchor questions, at most
``tolerance`` (0.003 in their scripts). The draws' noise is fixed across the search, so the
criterion is a deterministic function of σ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SINGULAR_FLOOR = 1e-6
"""Singular values below this give their row no noise: B' is 0 there, so A' is not used."""


@dataclass
class RotatedAdapters:
    """Every member's adapters as B' = U diag(s), A' = Vᵀ A, and the singular values s."""

    adapters: dict[str, torch.Tensor]  # keyed as LoRAEnsemble.stacked_adapters
    singular: dict[str, torch.Tensor]  # "{layer}" -> (members, r)


def rotate(adapters: dict[str, torch.Tensor]) -> RotatedAdapters:
    rotated: dict[str, torch.Tensor] = {}
    singular: dict[str, torch.Tensor] = {}
    for key in adapters:
        if not key.endswith(".lora_B"):
            continue
        layer = key.removesuffix(".lora_B")
        b, a = adapters[key].double(), adapters[f"{layer}.lora_A"].double()
        u, s, vh = torch.linalg.svd(b, full_matrices=False)  # (M, out, r), (M, r), (M, r, r)
        rotated[key] = (u * s[:, None, :]).float()
        rotated[f"{layer}.lora_A"] = (vh @ a).float()
        singular[layer] = s.float()
    return RotatedAdapters(rotated, singular)


def tfb_draws(
    rotated: RotatedAdapters, sigma: torch.Tensor, samples: int, seed: int
) -> dict[str, torch.Tensor]:
    """``samples`` draws of every member (σ = ``sigma[m]``) as (members · samples, …) tensors,
    member-major; the noise depends on ``seed`` alone, not on σ."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {}
    for key in sorted(rotated.adapters):
        mean = rotated.adapters[key]
        if key.endswith(".lora_B"):
            drawn[key] = mean.repeat_interleave(samples, dim=0)
            continue
        s = rotated.singular[key.removesuffix(".lora_A")]
        std = torch.where(
            s > SINGULAR_FLOOR, sigma.float()[:, None] / s.clamp(min=SINGULAR_FLOOR), 0.0
        )
        noise = torch.randn((mean.shape[0], samples, *mean.shape[1:]), generator=generator)
        draws = mean[:, None] + noise * std[:, None, :, None]
        drawn[key] = draws.reshape(-1, *mean.shape[1:])
    return drawn


@dataclass
class SigmaSearch:
    """The bisection's outcome per member and every step it took."""

    sigma: torch.Tensor  # (members,) the largest σ found within tolerance
    above: torch.Tensor  # (members,) the smallest σ found beyond it
    steps: list[dict]  # {"sigma": [...], "change": [...]} per evaluation


def search_sigma(
    change_at: Callable[[torch.Tensor], torch.Tensor],
    n_members: int,
    *,
    tolerance: float,
    high: float = 0.2,
    steps: int = 8,
) -> SigmaSearch:
    """Largest σ ≤ ``high`` per member with ``change_at(σ) ≤ tolerance`` (``change_at`` maps
    (members,) σ to (members,) criteria, one stacked pass for all members). Doubles ``high``
    while it still meets the tolerance (at most 8 times), then bisects ``steps`` times."""
    log: list[dict] = []

    def evaluate(sigma: torch.Tensor) -> torch.Tensor:
        change = change_at(sigma)
        log.append({"sigma": sigma.tolist(), "change": change.tolist()})
        return change <= tolerance

    low = torch.zeros(n_members, dtype=torch.float64)
    up = torch.full((n_members,), high, dtype=torch.float64)
    for _ in range(8):
        fine = evaluate(up)
        if not fine.any():
            break
        low = torch.where(fine, up, low)
        up = torch.where(fine, up * 2, up)
    for _ in range(steps):
        mid = (low + up) / 2
        fine = evaluate(mid)
        low, up = torch.where(fine, mid, low), torch.where(fine, up, mid)
    return SigmaSearch(sigma=low, above=up, steps=log)

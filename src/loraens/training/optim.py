"""The optimiser over every member's stacked adapter tensors.

AdamW is elementwise, so one AdamW over tensors stacked by member performs exactly the per-member
updates M separate optimisers would: moments, bias correction and decay never mix members.
"""

from __future__ import annotations

import torch

from loraens.config import OptimConfig
from loraens.models.lora import LoRAEnsemble


def build_optimizer(ensemble: LoRAEnsemble, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices ``cfg.decay_target`` names and none elsewhere."""
    groups = [
        {
            "params": ensemble.lora_parameters(which),
            "weight_decay": cfg.weight_decay if cfg.decay_target in ("all", which) else 0.0,
            "name": f"lora_{which}",
        }
        for which in ("A", "B")
    ]
    if ensemble.variational:  # BLoB's scales: no decay, which would only shrink the variance
        groups.append(
            {"params": ensemble.lora_parameters("G"), "weight_decay": 0.0, "name": "lora_G"}
        )
    # foreach=False keeps the update order identical whatever the number of members, which the
    # stacked-vs-alone equivalence relies on; the tensors are tiny, so nothing is lost.
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=False)

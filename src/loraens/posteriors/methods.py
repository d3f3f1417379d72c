"""Each posterior method's predictive over a loaded ensemble, as every scoring command uses it
(:class:`~loraens.rundir.load.Predictive`): built once when fitted, and again from the saved
state when the posterior's folder is loaded."""

from __future__ import annotations

import numpy as np
import torch

from loraens.config import PosteriorConfig
from loraens.data.prompts import EncodedQuestions
from loraens.evaluation.inference import score_draws
from loraens.models.lora import LoRAEnsemble
from loraens.posteriors.laplace import LaplacePosterior
from loraens.posteriors.predictive import linearised_log_probs
from loraens.posteriors.tfb import RotatedAdapters, tfb_draws
from loraens.rundir.load import Predictive
from loraens.runtime import Runtime


def laplace_predictive(
    ensemble: LoRAEnsemble, runtime: Runtime, posterior: LaplacePosterior, cfg: PosteriorConfig
) -> Predictive:
    """Every member's Laplace predictive, linearised or sampled as ``cfg`` asks."""

    def predict(
        encoded: EncodedQuestions, label_ids: torch.Tensor, *, batch_size: int, progress: bool
    ) -> np.ndarray:
        if cfg.predictive == "linearised":
            return linearised_log_probs(
                ensemble,
                encoded,
                label_ids,
                runtime,
                posterior.logit_covariance,
                link=cfg.link,
                batch_size=cfg.batch_size,
                progress=progress,
            )[0]
        generator = torch.Generator().manual_seed(cfg.seed)
        draws = posterior.weight_draws(ensemble.stacked_adapters(), cfg.samples, generator)
        return score_draws(
            ensemble,
            draws,
            cfg.samples,
            encoded,
            label_ids,
            runtime,
            batch_size=batch_size,
            progress=progress,
        )

    return predict


def tfb_predictive(
    ensemble: LoRAEnsemble,
    runtime: Runtime,
    rotated: RotatedAdapters,
    sigma: torch.Tensor,
    cfg: PosteriorConfig,
) -> Predictive:
    """Every member's mean over ``cfg.samples`` TFB draws at its own σ."""

    def predict(
        encoded: EncodedQuestions, label_ids: torch.Tensor, *, batch_size: int, progress: bool
    ) -> np.ndarray:
        draws = tfb_draws(rotated, sigma, cfg.samples, cfg.seed)
        return score_draws(
            ensemble,
            draws,
            cfg.samples,
            encoded,
            label_ids,
            runtime,
            batch_size=batch_size,
            progress=progress,
        )

    return predict


def passes_per_question(cfg: PosteriorConfig, members: int, k_max: int) -> str:
    """What scoring one question costs in the stacked pass, in words."""
    if cfg.method == "laplace" and cfg.predictive == "linearised":
        return (
            f"1 forward and {k_max} backward passes over {members} rows (one per member), "
            f"batched {cfg.batch_size} questions at a time, plus {cfg.link} over the logits"
        )
    return f"1 forward pass over {members * cfg.samples} rows ({cfg.samples} draws per member)"

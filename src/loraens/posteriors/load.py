"""Load any scoreable run: a LoRA run as is, a posterior's folder as its source run's members
with the posterior's predictive attached, a last-layer ensemble through its own loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from loraens.baselines.last_layer import load_last_layer_run
from loraens.data.prompts import EncodedQuestions
from loraens.data.records import Question
from loraens.evaluation.evaluate import score_questions
from loraens.evaluation.inference import score_variational
from loraens.models.lora import LoRAEnsemble
from loraens.posteriors.laplace import LaplacePosterior, map_norms
from loraens.posteriors.methods import laplace_predictive, tfb_predictive
from loraens.posteriors.state import is_posterior, read_factors, read_posterior_record
from loraens.posteriors.tfb import rotate
from loraens.rundir import RunDir
from loraens.rundir.load import LoadedEnsemble, Predictive, load_run
from loraens.runtime import Runtime

Scorer = Callable[[Sequence[Question]], np.ndarray]


def load_scorer(
    run_dir: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    *,
    trust_remote_code: bool = False,
) -> LoadedEnsemble:
    """:func:`~loraens.rundir.load.load_run` for a LoRA run; for a posterior's folder, the
    run it was fitted on with the posterior's predictive (``LoadedEnsemble.predictive``)."""
    folder = Path(run_dir)
    if not is_posterior(folder):
        loaded = load_run(folder, device, precision, trust_remote_code=trust_remote_code)
        if loaded.ensemble.variational:  # BLoB: the mean over each member's weight draws
            samples = RunDir(folder).read_config().blob.eval_samples
            loaded.predictive = blob_predictive(loaded.ensemble, loaded.runtime, samples)
        return loaded
    record = read_posterior_record(folder)
    source = (folder / record.source).resolve()
    loaded = load_run(source, device, precision, trust_remote_code=trust_remote_code)
    if loaded.ensemble.n_members != record.members:
        raise ValueError(
            f"{folder} was fitted on {record.members} members, {source} now holds "
            f"{loaded.ensemble.n_members}: fit the posterior again."
        )
    cfg = record.posterior_config
    ensemble, runtime = loaded.ensemble, loaded.runtime
    adapters = ensemble.stacked_adapters()
    if record.method == "laplace":
        posterior = LaplacePosterior(
            read_factors(folder),
            map_norms(adapters),
            torch.tensor(record.prior_precision, dtype=torch.float64),
        )
        loaded.predictive = laplace_predictive(ensemble, runtime, posterior, cfg)
    else:
        sigma = torch.tensor(record.sigma, dtype=torch.float64)
        loaded.predictive = tfb_predictive(ensemble, runtime, rotate(adapters), sigma, cfg)
    return loaded


def blob_predictive(ensemble: LoRAEnsemble, runtime: Runtime, samples: int) -> Predictive:
    """A BLoB run's predictive: every member's mean over ``samples`` weight draws."""

    def predict(
        encoded: EncodedQuestions, label_ids: torch.Tensor, *, batch_size: int, progress: bool
    ) -> np.ndarray:
        return score_variational(
            ensemble, encoded, label_ids, runtime, samples, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip

    return predict


def run_scorer(
    run: str | Path,
    *,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 32,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> Scorer:
    """Load ``run`` once (any method, a posterior's folder included); the function it returns
    gives every member's (M, N, K) log p_T on a question set (MC dropout: every pass)."""
    folder = Path(run)
    if not is_posterior(folder) and RunDir(folder).read_config().ensemble.method == "last_layer":
        last = load_last_layer_run(run, device, precision, trust_remote_code=trust_remote_code)
        return lambda questions: last.score(questions, batch_size=batch_size)
    loaded = load_scorer(run, device, precision, trust_remote_code=trust_remote_code)
    return lambda questions: score_questions(
        loaded, questions, batch_size=batch_size, progress=progress
    )

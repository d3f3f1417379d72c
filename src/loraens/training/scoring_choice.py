"""``--model.scoring auto``: the scoring mode chosen from the base model's own zero-shot figures.

Before a new run trains, the base model (no adapters) scores a fixed draw of at most
:data:`CHOICE_QUESTIONS` of its training questions in every mode: by letter, and by answer text
under each normalisation. ``auto`` takes the mode with the lowest NLL; an explicit mode whose NLL
is far above the best gets a warning naming the flags of the better one. Why it matters: with
summed log-likelihoods an option's length can decide its score, and a model that cannot answer
by letter trains to chance by letter (issue 32's medical set, zero-shot NLL: letter 1.52, text
9.24 summed, 2.13 per token, 1.49 per character).

The choice is written to the run's config.yaml, so a resume and every later command read the
concrete mode and nothing chooses twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraens.baselines.few_shot import base_model_as_ensemble
from loraens.config import Normalization, Scoring, TrainConfig
from loraens.data.prompts import TokenizerError, encode_questions, scoring_label_ids
from loraens.data.records import Question
from loraens.data.sources import subset
from loraens.evaluation.inference import score_members
from loraens.evaluation.metrics import summarize
from loraens.runtime import Runtime

log = logging.getLogger(__name__)

CHOICE_QUESTIONS = 48
"""Training questions scored per mode: enough to tell a mode that is several times worse (the
case that matters) at a cost of a few seconds to a minute on a CPU."""
# A constant, not the run's seeds: runs that differ only in seed then choose from the same
# questions, so an experiment's seeds cannot end up in different modes by chance.
CHOICE_SEED = 0
FAR_WORSE_NLL = 1.25
"""An explicit mode is warned about when its zero-shot NLL exceeds the best mode's by this
factor. The modes worth a warning differ several-fold (summed text 9.24 against 1.49 per
character on issue 32's medical set, 4.31 against 1.53 on cqa); a near tie (letter's 1.52 on
the medical set) is left alone, as a few dozen questions cannot tell it from noise."""
MODES: tuple[tuple[Scoring, Normalization], ...] = (
    ("letter", "none"),
    ("answer_text", "none"),
    ("answer_text", "per_token"),
    ("answer_text", "per_char"),
)
"""Every concrete mode, in the order ties are broken (the earlier wins)."""


@dataclass(frozen=True)
class ModeFigures:
    """One scoring mode's zero-shot figures on the choice questions."""

    scoring: Scoring
    normalization: Normalization
    accuracy: float
    nll: float
    ece: float

    @property
    def name(self) -> str:
        return "letter" if self.scoring == "letter" else f"answer_text {self.normalization}"

    @property
    def flags(self) -> str:
        """The command-line flags that select this mode."""
        if self.scoring == "letter":
            return "--model.scoring letter"
        return f"--model.scoring answer_text --model.normalization {self.normalization}"


def zero_shot_figures(
    model,
    tokenizer,
    questions: Sequence[Question],
    max_length: int,
    runtime: Runtime,
    batch_size: int = 32,
) -> list[ModeFigures]:
    """Accuracy, NLL and ECE of the base model in every mode of :data:`MODES` (letter left out
    where the tokenizer cannot score answer letters)."""
    labels = np.asarray([q.answer for q in questions])
    n_letters = max(len(q.choices) for q in questions)
    figures = []
    with base_model_as_ensemble(model) as ensemble:
        for scoring, normalization in MODES:
            try:
                letters = scoring_label_ids(tokenizer, n_letters, scoring)
            except TokenizerError:
                log.info("  letter: not available (the tokenizer splits the answer letters)")
                continue
            label_ids = torch.tensor(letters, dtype=torch.long, device=runtime.device)
            encoded = encode_questions(
                tokenizer, list(questions), max_length, scoring, normalization
            )
            log_p = score_members(ensemble, encoded, label_ids, runtime, batch_size=batch_size)
            metrics = summarize(log_p[0], labels)
            figures.append(
                ModeFigures(
                    scoring, normalization, metrics["accuracy"], metrics["nll"], metrics["ece"]
                )
            )
    return figures


def best_mode(figures: Sequence[ModeFigures]) -> ModeFigures:
    """The mode with the lowest NLL (on a tie, the earliest in :data:`MODES`)."""
    return min(figures, key=lambda f: f.nll)  # min keeps the first of equal keys


def with_scoring(cfg: TrainConfig, scoring: Scoring, normalization: Normalization) -> TrainConfig:
    """``cfg`` scoring in the given mode. optim.loss=option_nll is a loss over answer texts;
    letter scoring trains the letter's own NLL (Eq. 3), so a choice of letter takes token_nll."""
    optim = cfg.optim
    if scoring == "letter" and optim.loss == "option_nll":
        optim = dataclasses.replace(optim, loss="token_nll")
    model = dataclasses.replace(cfg.model, scoring=scoring, normalization=normalization)
    return dataclasses.replace(cfg, model=model, optim=optim)


def keep_stored_scoring(cfg: TrainConfig, stored: TrainConfig) -> TrainConfig:
    """``cfg`` continuing the run whose saved config is ``stored``: ``auto`` takes the mode that
    run chose, so a rerun of the same command continues it rather than choosing again."""
    if cfg.model.scoring != "auto":
        return cfg
    return with_scoring(cfg, stored.model.scoring, stored.model.normalization)


def choose_scoring(
    cfg: TrainConfig, model, tokenizer, train_qs: Sequence[Question], runtime: Runtime
) -> TrainConfig:
    """A new run's config with a concrete scoring mode: ``auto`` resolved to the mode of lowest
    zero-shot NLL, an explicit mode kept (with a warning where another is far better). Every
    mode's figures are logged."""
    questions = subset(list(train_qs), CHOICE_QUESTIONS, CHOICE_SEED)
    log.info(
        "Scoring modes, zero-shot (the base model, no training) on %d training questions:",
        len(questions),
    )
    figures = zero_shot_figures(
        model, tokenizer, questions, cfg.model.max_length, runtime, cfg.runtime.eval_batch_size
    )
    best = best_mode(figures)
    for f in figures:
        mark = "  <- lowest NLL" if f is best else ""
        log.info(
            "  %-22s accuracy %.3f  nll %.3f  ece %.3f%s", f.name, f.accuracy, f.nll, f.ece, mark
        )
    if cfg.model.scoring == "auto":
        chosen = with_scoring(cfg, best.scoring, best.normalization)
        log.info("model.scoring auto: scoring by %s (%s).", best.name, best.flags)
        if chosen.optim.loss != cfg.optim.loss:
            log.info("optim.loss: token_nll, the letter's NLL (option_nll needs answer text).")
        return chosen
    _warn_if_far_worse(cfg, figures, best)
    return cfg


def _warn_if_far_worse(cfg: TrainConfig, figures: Sequence[ModeFigures], best: ModeFigures) -> None:
    mode = (cfg.model.scoring, cfg.model.normalization)
    own = next((f for f in figures if (f.scoring, f.normalization) == mode), None)
    if own is None or own.nll <= FAR_WORSE_NLL * best.nll:
        return
    log.warning(
        "Scoring by %s, whose zero-shot NLL %.3f is %.1fx that of %s (%.3f). Consider %s "
        "(or --model.scoring auto).",
        own.name,
        own.nll,
        own.nll / best.nll,
        best.name,
        best.nll,
        best.flags,
    )

"""The expected duration of a run, announced once its first optimiser step is measured."""

from __future__ import annotations

import logging
from collections.abc import Callable

from loraens.data.prompts import EncodedQuestions

log = logging.getLogger("loraens.training")

# A forward pass costs about a third of forward + backward per token, but evaluation's
# per-token time is not a third of training's in practice: `make demo` in fp32 on a 2-core
# AVX2 EPYC trained 88.9k tokens in 375 s and spent 227 s on the rest, almost all of it
# scoring 98.4k tokens (5 members × 300 questions), a ratio of 0.55 (bench/throughput.py
# --demo-rss). Erring long is kinder than a promise the run breaks.
EVAL_COST_PER_TOKEN = 0.55


def expected_seconds(
    first_step: float,
    first_step_tokens: int,
    train_tokens_per_epoch: int,
    epochs: int,
    eval_tokens: int,
) -> float:
    """Training plus evaluation time, scaled by tokens from the first step's seconds."""
    per_token = first_step / max(first_step_tokens, 1)
    return per_token * (epochs * train_tokens_per_epoch + EVAL_COST_PER_TOKEN * eval_tokens)


def announce_duration(
    trainer,
    cfg,
    epochs_done: int,
    eval_set: EncodedQuestions,
    ood_set: EncodedQuestions,
    holdout_set: EncodedQuestions,
    say: Callable[[str], None] | None = None,
) -> Callable[[float], None]:
    """An ``on_step`` hook for ``trainer`` that logs, after the first step, the expected time
    of the rest of a run of ``cfg`` (a TrainConfig) that has ``epochs_done`` epochs behind it:
    its training epochs, and every member scoring the eval (+ OOD) set at each evaluated epoch
    and the held-out slice every epoch (``optim.patience``)."""
    say = say or log.info
    last = cfg.optim.epochs
    epochs = range(epochs_done + 1, last + 1)
    evaluated = [e for e in epochs if e == last or e % cfg.runtime.eval_every == 0]
    sets = [eval_set, ood_set] * len(evaluated)
    if cfg.optim.patience is not None:
        sets += [holdout_set] * len(epochs)
    eval_tokens = cfg.ensemble.members * sum(sum(map(len, s.input_ids)) for s in sets)
    tokens_before = trainer.tokens_seen
    done = False

    def hook(seconds: float) -> None:
        nonlocal done
        if done:
            return
        done = True
        per_epoch = len(trainer.data_seeds) * sum(trainer.lengths)
        total = expected_seconds(
            seconds, trainer.tokens_seen - tokens_before, per_epoch, len(epochs), eval_tokens
        )
        say(
            f"first step took {seconds:.1f} s: expect about {_duration(total)} for "
            f"{len(epochs)} epoch(s) and evaluation (estimated from that step's tokens)"
        )

    return hook


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"

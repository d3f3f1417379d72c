"""The expected duration of a run: announced once its first optimiser step is measured, then
re-estimated from the measured training and evaluation of its first evaluated epoch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from loraens.config import Scoring
from loraens.data.prompts import EncodedQuestions

log = logging.getLogger("loraens.training")

# Before anything is scored, evaluation's time per token can only be guessed from training's.
# A forward pass costs about a third of forward + backward, but measured ratios are higher and
# depend on how options are scored (fp32, 2-core AVX2 EPYC): letter scoring 0.55 (the old
# letter-scored ARC-Easy demo, bench/throughput.py --demo-rss); answer text 0.40 to 0.46 on
# `make demo` (224 s for 40,770 training tokens, 219 s for 86,430 scored) and 0.41 on the cqa
# and arce 'none' cells of experiments/overconfidence-cpu.yaml (seed 0, counting model loading
# and the final hold-out scoring as evaluation). The first step is also slower than an average
# one (5-17% on these runs), which leaves the announcement on the long side.
EVAL_COST_PER_TOKEN: dict[Scoring, float] = {"letter": 0.55, "answer_text": 0.40}


@dataclass(frozen=True)
class RunPlan:
    """The work left in a run, in tokens: each epoch's training tokens (this process's members),
    and per remaining epoch the tokens its members score after it (0 if none)."""

    train_tokens: int
    scored_tokens: tuple[int, ...]

    @property
    def epochs(self) -> int:
        return len(self.scored_tokens)

    def seconds(self, train_per_token: float, eval_per_token: float, after: int = 0) -> float:
        """Seconds of the epochs that follow the first ``after``, at these costs per token."""
        rest = self.scored_tokens[after:]
        return len(rest) * self.train_tokens * train_per_token + sum(rest) * eval_per_token

    def first_guess(self, step_seconds: float, step_tokens: int, scoring: Scoring) -> float:
        """The whole plan's seconds from the first step alone."""
        per_token = step_seconds / max(step_tokens, 1)
        return self.seconds(per_token, EVAL_COST_PER_TOKEN[scoring] * per_token)

    def remeasured(
        self, epochs_done: int, train_seconds: float, train_tokens: int, eval_seconds: float
    ) -> float:
        """Seconds left after ``epochs_done`` epochs, the last of them scored: training at the
        rate of those epochs (``train_seconds`` for ``train_tokens``), evaluation at that last
        scoring's (``eval_seconds`` for its tokens)."""
        scored = max(self.scored_tokens[epochs_done - 1], 1)
        train_rate = train_seconds / max(train_tokens, 1)
        return self.seconds(train_rate, eval_seconds / scored, after=epochs_done)


def run_plan(
    trainer,
    cfg,
    epochs_done: int,
    eval_set: EncodedQuestions,
    ood_set: EncodedQuestions,
    holdout_set: EncodedQuestions,
) -> RunPlan:
    """What is left of a run of ``cfg`` (a TrainConfig) with ``epochs_done`` epochs behind it:
    its training epochs, every member scoring the eval (+ OOD) set at each evaluated epoch and
    the held-out slice every epoch (``optim.patience``)."""

    def tokens(s: EncodedQuestions) -> int:
        return cfg.ensemble.members * sum(map(len, s.input_ids))

    evaluation = tokens(eval_set) + tokens(ood_set)
    holdout = tokens(holdout_set) if cfg.optim.patience is not None else 0
    scored = tuple(
        holdout + (evaluation if evaluated else 0) for evaluated in _evaluated(cfg, epochs_done)
    )
    return RunPlan(len(trainer.data_seeds) * sum(trainer.lengths), scored)


class _Announcer:
    """An ``on_step`` hook. Evaluation happens between steps, so the gap between the last step
    of an evaluated epoch and the next epoch's first step is what that evaluation cost."""

    def __init__(
        self,
        trainer,
        plan: RunPlan,
        scoring: Scoring,
        evaluated: int | None,
        epochs_before: int,
        say: Callable[[str], None],
        clock: Callable[[], float],
    ):
        self.trainer, self.plan, self.scoring = trainer, plan, scoring
        self.say, self.clock = say, clock
        self.steps_per_epoch = trainer.steps_per_epoch()
        # the step that follows the first evaluated epoch, unless that epoch is the run's last
        self.recheck_step: int | None = None
        if evaluated is not None and evaluated + 1 < plan.epochs:
            self.recheck_step = (evaluated + 1) * self.steps_per_epoch
        self.epochs_before = epochs_before
        self.steps = 0
        self.train_seconds = 0.0
        self.tokens_before = trainer.tokens_seen
        self.tokens_trained = 0  # up to the end of the previous step
        self.first_step = (0.0, 0)  # its seconds and tokens
        self.last_step_end = 0.0

    def __call__(self, seconds: float) -> None:
        now = self.clock()
        if self.steps == 0:
            total = self.plan.first_guess(
                seconds, self.trainer.tokens_seen - self.tokens_before, self.scoring
            )
            later = "; updated after the first evaluated epoch" if self.recheck_step else ""
            self.say(
                f"first step took {seconds:.1f} s: expect about {_duration(total)} for "
                f"{self.plan.epochs} epoch(s) and evaluation (estimated from that step's "
                f"tokens{later})"
            )
        elif self.steps == self.recheck_step:
            epochs = self.steps // self.steps_per_epoch
            evaluation = now - seconds - self.last_step_end
            # Without the first step, unless it is the only one: its one-off warm-up (up to
            # twice a later step's time on a 2-core CPU) is behind the run, and it would weigh
            # on an epoch of a few steps.
            warm_up = self.first_step if self.steps > 1 else (0.0, 0)
            left = self.plan.remeasured(
                epochs,
                self.train_seconds - warm_up[0],
                self.tokens_trained - warm_up[1],
                evaluation,
            )
            self.say(
                f"{self.train_seconds:.0f} s of training over {epochs} epoch(s), "
                f"{evaluation:.0f} s evaluating epoch {self.epochs_before + epochs}: expect "
                f"about {_duration(left)} more for the other {self.plan.epochs - epochs} "
                f"epoch(s) and evaluation"
            )
        self.steps += 1
        self.train_seconds += seconds
        self.tokens_trained = self.trainer.tokens_seen - self.tokens_before
        self.last_step_end = now
        if self.steps == 1:
            self.first_step = (seconds, self.tokens_trained)


def announce_duration(
    trainer,
    cfg,
    epochs_done: int,
    eval_set: EncodedQuestions,
    ood_set: EncodedQuestions,
    holdout_set: EncodedQuestions,
    say: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[float], None]:
    """An ``on_step`` hook for ``trainer`` that logs the expected time of the rest of a run of
    ``cfg`` (a TrainConfig) that has ``epochs_done`` epochs behind it (see run_plan): after the
    first step, and again at the first step after its first evaluated epoch."""
    plan = run_plan(trainer, cfg, epochs_done, eval_set, ood_set, holdout_set)
    evaluated = next((i for i, e in enumerate(_evaluated(cfg, epochs_done)) if e), None)
    return _Announcer(
        trainer, plan, eval_set.scoring, evaluated, epochs_done, say or log.info, clock
    )


def _evaluated(cfg, epochs_done: int) -> list[bool]:
    """Whether each epoch after the first ``epochs_done`` scores the eval set (as run.py does)."""
    last = cfg.optim.epochs
    return [e == last or e % cfg.runtime.eval_every == 0 for e in range(epochs_done + 1, last + 1)]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"

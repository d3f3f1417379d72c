"""The expected-duration announcements: after a run's first optimiser step, and again after its
first evaluated epoch. Timings are faked: nothing here depends on the machine's speed."""

from types import SimpleNamespace

import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer

from loraens.config import OptimConfig, RuntimeConfig, TrainConfig
from loraens.data.prompts import EncodedQuestions, encode_questions, label_token_ids
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime
from loraens.training.eta import EVAL_COST_PER_TOKEN, RunPlan, announce_duration
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer


def _config(epochs: int, eval_every: int = 1, members: int = 2) -> TrainConfig:
    cfg = TrainConfig(
        optim=OptimConfig(epochs=epochs), runtime=RuntimeConfig(eval_every=eval_every)
    )
    cfg.ensemble.members = members
    return cfg


def _questions(*lengths: int, answer_text: bool = False) -> EncodedQuestions:
    options = object() if answer_text else None  # only its presence sets the scoring mode
    return EncodedQuestions(
        [[0] * n for n in lengths], [2] * len(lengths), [0] * len(lengths), 0, options
    )  # type: ignore[arg-type]


class _FakeTrainer(SimpleNamespace):
    """What the hook reads of a trainer: 2 members, 100 tokens an epoch in 2 steps of 50."""

    def __init__(self):
        super().__init__(tokens_seen=0, data_seeds=[0, 1], lengths=[30, 20])

    def steps_per_epoch(self) -> int:
        return 2


class _Clock:
    """The hook's clock: reads the time each step ended, as set by ``run``."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def run(self, hook, trainer, steps: list[tuple[float, float]]) -> None:
        """Call ``hook`` as the trainer would, for each (step seconds, time it ends)."""
        for seconds, end in steps:
            trainer.tokens_seen += 50
            self.now = end
            hook(seconds)


@pytest.mark.parametrize("answer_text", [False, True])
def test_first_step_then_measured_epoch_and_evaluation(answer_text):
    trainer = _FakeTrainer()
    evaluation = _questions(10, 15, answer_text=answer_text)  # 2 members x 25 = 50 scored
    empty = _questions()
    said: list[str] = []
    clock = _Clock()
    hook = announce_duration(trainer, _config(3), 0, evaluation, empty, empty, said.append, clock)
    steps = [(2.0, 12.0), (1.0, 13.0)]  # epoch 1: 3 s for 100 tokens, the first step slow
    steps += [(1.5, 19.5)]  # epoch 2's first step starts at 18.0: 5 s of evaluation after 1
    steps += [(1.5, 21.0), (1.5, 30.0), (1.5, 31.5)]
    clock.run(hook, trainer, steps)

    ratio = EVAL_COST_PER_TOKEN["answer_text" if answer_text else "letter"]
    first_guess = 2.0 / 50 * (3 * 100 + ratio * 3 * 50)  # the first step's seconds per token
    # 2 more epochs: training at epoch 1's 1 s per 50 tokens after its warm-up step,
    # evaluation at epoch 1's 5 s per 50 tokens
    left = 2 * 100 * 1.0 / 50 + 2 * 50 * 5.0 / 50
    assert said == [
        f"first step took 2.0 s: expect about {first_guess:.0f} s for 3 epoch(s) and "
        "evaluation (estimated from that step's tokens; updated after the first evaluated epoch)",
        f"3 s of training over 1 epoch(s), 5 s evaluating epoch 1: expect about {left:.0f} s "
        "more for the other 2 epoch(s) and evaluation",
    ]


def test_updates_after_the_first_evaluated_epoch_of_a_resumed_run():
    # Resumed after epoch 1 of 6, evaluated every 2 epochs with an OOD set and early stopping:
    # epochs 2 to 6 each score the held-out slice, epochs 2, 4 and 6 the eval and OOD sets too.
    trainer = _FakeTrainer()
    cfg = _config(6, eval_every=2)
    cfg.optim.patience = 3
    evaluation, ood, holdout = _questions(20), _questions(10), _questions(5)
    said: list[str] = []
    clock = _Clock()
    hook = announce_duration(trainer, cfg, 1, evaluation, ood, holdout, said.append, clock)
    clock.run(hook, trainer, [(1.0, 1.0), (1.0, 2.0), (1.0, 11.0), (1.0, 12.0)])
    # 2 s for 100 tokens; epoch 2's scoring took 8 s for 2 x (20 + 10 + 5) = 70 tokens, and
    # epochs 3 to 6 will score 10, 70, 10 and 70
    left = 4 * 100 * 2.0 / 100 + (10 + 70 + 10 + 70) * 8.0 / 70
    assert len(said) == 2
    assert said[1] == (
        f"2 s of training over 1 epoch(s), 8 s evaluating epoch 2: expect about {left:.0f} s "
        "more for the other 4 epoch(s) and evaluation"
    )


def test_no_update_when_the_first_evaluated_epoch_is_the_last():
    trainer = _FakeTrainer()
    said: list[str] = []
    empty = _questions()
    clock = _Clock()
    cfg = _config(2, eval_every=5)
    hook = announce_duration(trainer, cfg, 0, _questions(9), empty, empty, said.append, clock)
    clock.run(hook, trainer, [(1.0, 1.0), (1.0, 2.0), (1.0, 3.0), (1.0, 4.0)])
    assert len(said) == 1 and "updated after" not in said[0]


def test_an_epoch_of_one_step_keeps_that_step():
    trainer = _FakeTrainer()
    trainer.steps_per_epoch, trainer.lengths = lambda: 1, [15, 10]  # 50 tokens an epoch
    said: list[str] = []
    empty = _questions()
    clock = _Clock()
    hook = announce_duration(
        trainer, _config(3), 0, _questions(25), empty, empty, said.append, clock
    )
    clock.run(hook, trainer, [(4.0, 4.0), (1.0, 10.0)])  # 5 s of evaluation, 4 s per 50 tokens
    left = 2 * 50 * 4.0 / 50 + 2 * 50 * 5.0 / 50
    assert f"expect about {left:.0f} s more for the other 2" in said[1]


def test_plan_arithmetic():
    plan = RunPlan(train_tokens=100, scored_tokens=(0, 40, 0, 40))
    assert plan.epochs == 4
    assert plan.seconds(0.1, 0.5) == pytest.approx(4 * 10 + 80 * 0.5)
    assert plan.seconds(0.1, 0.5, after=2) == pytest.approx(2 * 10 + 40 * 0.5)
    assert plan.first_guess(3.0, 30, "letter") == pytest.approx(0.1 * (400 + 0.55 * 80))
    # after epoch 2 (scored): 25 s for 200 training tokens, 8 s for epoch 2's 40 scored tokens
    assert plan.remeasured(2, 25.0, 200, 8.0) == pytest.approx(2 * 100 * 0.125 + 40 * 0.2)


# Measured runs (fp32, 2-core AVX2 EPYC): seconds and tokens of training, tokens scored per
# epoch, and the time the estimate should come near. The demo (configs/demo.yaml, 7 min 36 s
# in all): its 224 s of training and 219 s of evaluation. The 'none' cells (seed 0) of
# experiments/overconfidence-cpu.yaml: their whole wall time (summary.json).
MEASURED = {
    "demo": (224.0, 40_770, [5 * 5762] * 3, 224.0 + 219.0),
    "overconfidence cqa": (333.9, 68_240, [5 * 11_614] * 4, 807.5),
    "overconfidence arce": (541.6, 99_600, [5 * 17_600] * 4, 1350.1),
}


@pytest.mark.parametrize("run", MEASURED)
@pytest.mark.parametrize("slow_first_step", [1.0, 1.17])  # 5-17% slower than the mean on these
def test_first_guess_is_within_20_percent_of_measured_answer_text_runs(run, slow_first_step):
    train_seconds, train_tokens, scored, actual = MEASURED[run]
    plan = RunPlan(train_tokens // len(scored), tuple(scored))
    step_seconds = slow_first_step * train_seconds / train_tokens * 1000
    assert plan.first_guess(step_seconds, 1000, "answer_text") == pytest.approx(actual, rel=0.2)


def test_announces_from_a_real_trainer_once_per_estimate():
    tokenizer = tiny_tokenizer()
    train = encode_questions(tokenizer, make_questions(8, seed=1), max_length=256)
    evaluation = encode_questions(tokenizer, make_questions(5, seed=2), max_length=256)
    empty = encode_questions(tokenizer, [], max_length=256)
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), 2)
    ensemble.init_members([1, 2])
    trainer = EnsembleTrainer(
        ensemble, build_optimizer(ensemble, OptimConfig()), train,
        torch.tensor(label_token_ids(tokenizer)), Runtime(torch.device("cpu"), None),
        data_seeds=[3, 4], batch_size=4,
    )  # fmt: skip
    said: list[str] = []
    cfg = _config(4, eval_every=2)
    trainer.on_step = announce_duration(trainer, cfg, 1, evaluation, empty, empty, said.append)
    trainer.train_epoch(1)  # 2 steps: the first one speaks
    assert len(said) == 1 and "3 epoch(s)" in said[0]
    trainer.train_epoch(2)  # after evaluated epoch 2: its first step speaks again
    trainer.train_epoch(3)
    assert len(said) == 2 and "evaluating epoch 2" in said[1] and "other 2 epoch(s)" in said[1]

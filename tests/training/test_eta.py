"""The expected-duration announcement made after a run's first optimiser step."""

import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer

from loraens.config import OptimConfig, RuntimeConfig, TrainConfig
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime
from loraens.training.eta import announce_duration
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer


def test_announces_once_scaled_by_tokens():
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
    cfg = TrainConfig(optim=OptimConfig(epochs=4), runtime=RuntimeConfig(eval_every=2))
    cfg.ensemble.members = 2
    said: list[str] = []
    trainer.on_step = announce_duration(trainer, cfg, 1, evaluation, empty, empty, said.append)
    trainer.train_epoch(1)  # calls the hook after each of its 2 steps; it speaks once
    assert len(said) == 1 and "3 epoch(s)" in said[0]

    said.clear()
    hook = announce_duration(trainer, cfg, 1, evaluation, empty, empty, said.append)
    trainer.tokens_seen += 1000  # as if the first step had carried 1000 prompt tokens
    hook(50.0)
    hook(50.0)
    # 3 epochs of both members' questions, plus evaluation at epochs 2 and 4 (0.55 of the cost
    # per token, as measured on the demo)
    train_tokens = 2 * sum(map(len, train.input_ids))
    eval_tokens = 2 * 2 * sum(map(len, evaluation.input_ids))
    expected = 50.0 / 1000 * (3 * train_tokens + 0.55 * eval_tokens)
    assert len(said) == 1
    assert f"expect about {expected / 60:.0f} min" in said[0]

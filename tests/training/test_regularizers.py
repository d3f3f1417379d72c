"""The paper's regularisers (KL to the base model, weight decay), each wired so that a mistake
would show."""

import pytest
import torch
from helpers import FP32, encoded_tiny_data, tiny_llama, train_tiny_ensemble

from loraens.config import OptimConfig
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_features, vocab_log_probs
from loraens.training.kl import base_log_probs, kl_to_base
from loraens.training.optim import build_optimizer


@pytest.fixture(scope="module")
def data():
    return encoded_tiny_data()


def _mean_kl_to_base(ensemble, encoded):
    reference = base_log_probs(ensemble, encoded, FP32)
    with ensemble.members(slice(0, 1)):
        features = answer_features(ensemble.model, encoded, FP32)
    with torch.no_grad():
        return kl_to_base(vocab_log_probs(ensemble.model, features), reference).mean().item()


def test_huge_kl_weight_keeps_the_fine_tuned_distribution_at_the_base(data):
    free = train_tiny_ensemble(data, OptimConfig(lr=1e-2, kl_beta=0.0))
    tied = train_tiny_ensemble(data, OptimConfig(lr=1e-2, kl_beta=1e4))
    train = data[1]
    assert _mean_kl_to_base(free, train) > 20 * _mean_kl_to_base(tied, train)


def test_kl_reference_is_the_base_model_even_after_training(data):
    tokenizer, train, _, _ = data
    trained = train_tiny_ensemble(data, OptimConfig(lr=1e-2))
    plain = LoRAEnsemble(tiny_llama(len(tokenizer)), 1)  # B = 0: exactly the base model
    torch.testing.assert_close(
        base_log_probs(trained, train, FP32).float(),
        base_log_probs(plain, train, FP32).float(),
        atol=2e-2,
        rtol=0,  # stored in float16
    )


@pytest.mark.parametrize(
    "target, decays", [("B", (0.0, 1.0)), ("A", (1.0, 0.0)), ("all", (1.0, 1.0))]
)
def test_weight_decay_reaches_only_its_target(data, target, decays):
    tokenizer = data[0]
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), 2)
    optimizer = build_optimizer(ensemble, OptimConfig(weight_decay=1.0, decay_target=target))
    assert tuple(g["weight_decay"] for g in optimizer.param_groups) == decays
    assert [g["name"] for g in optimizer.param_groups] == ["lora_A", "lora_B"]


def test_strong_b_decay_keeps_b_small(data):
    def b_norm(ensemble):
        return sum(p.norm().item() for p in ensemble.lora_parameters("B"))

    free = train_tiny_ensemble(data, OptimConfig(lr=1e-2, weight_decay=0.0))
    decayed = train_tiny_ensemble(
        data, OptimConfig(lr=1e-2, weight_decay=50.0, decay_target="B")
    )
    assert b_norm(decayed) < 0.5 * b_norm(free)



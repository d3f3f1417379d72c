"""The paper's regularisers (KL to the base model, weight decay), each wired so that a mistake
would show."""

import numpy as np
import pytest
import torch
from helpers import FP32, encoded_tiny_data, tiny_llama, train_tiny_ensemble

import loraens.training.trainer as trainer_module
from loraens.config import OptimConfig
from loraens.data.packing import rows_batch
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime
from loraens.training.kl import base_log_probs, kl_to_base
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer

BF16 = Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def data():
    return encoded_tiny_data()


def _answer_logits(model, encoded) -> torch.Tensor:
    """Full-vocabulary logits at each question's last prompt token: one plain, unpadded
    Hugging Face forward per question, independent of loraens' scoring code."""
    with torch.no_grad():
        return torch.stack(
            [model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in encoded.input_ids]
        )


def _kl_float64(p_logits, q_logits) -> torch.Tensor:
    """KL(p || q) = Σ p log(p / q) per row, written out in float64."""
    p = torch.softmax(p_logits.double(), dim=-1)
    q = torch.softmax(q_logits.double(), dim=-1)
    return (p * (p.log() - q.log())).sum(dim=-1)


def _member_logits(ensemble, member, encoded) -> torch.Tensor:
    with ensemble.members(slice(member, member + 1)):
        return _answer_logits(ensemble.model, encoded)


def _randomize_b(ensemble, scale, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ensemble.lora_parameters("B"):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def test_kl_to_base_is_kl_of_the_fine_tuned_from_the_base_distribution():
    generator = torch.Generator().manual_seed(0)
    tuned, base = torch.randn(2, 6, 11, generator=generator) * 3
    forward = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=tuned.double()),
        torch.distributions.Categorical(logits=base.double()),
    )
    reverse = _kl_float64(base, tuned)
    assert (forward - reverse).abs().min() > 1e-3  # every row tells the two directions apart
    torch.testing.assert_close(forward, _kl_float64(tuned, base))
    ours = kl_to_base(torch.log_softmax(tuned, dim=-1), torch.log_softmax(base, dim=-1))
    torch.testing.assert_close(ours.double(), forward, rtol=1e-5, atol=1e-6)


def test_training_loss_is_nll_plus_beta_kl_from_the_base_in_the_papers_direction(data):
    """Each member's training loss is mean(-log p(y) + β·KL(p_member || p_base)), Eq. 3 + 4,
    checked against plain Hugging Face forwards and a float64 KL written out by hand."""
    tokenizer, train, _, label_ids = data
    beta = 2.0
    # Larger initial weights than the default (0.02) make peaked distributions, on which the
    # two directions of the KL differ clearly.
    sharp = dict(initializer_range=0.2)
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer), **sharp), 2)
    ensemble.init_members([0, 1])
    _randomize_b(ensemble, scale=0.5)  # members far from the base, so that KL is large
    base = _answer_logits(tiny_llama(len(tokenizer), **sharp), train)
    labels = label_ids[torch.tensor(train.labels)]
    expected, reversed_kl = [], []
    for m in range(2):
        logits = _member_logits(ensemble, m, train)
        nll = -torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(train)), labels]
        expected.append((nll + beta * _kl_float64(logits, base)).mean().item())
        reversed_kl.append((nll + beta * _kl_float64(base, logits)).mean().item())
    assert min(abs(a - b) for a, b in zip(expected, reversed_kl, strict=True)) > 1e-2

    # lr 1e-12: the adapters move by ~1e-12 in the epoch, so the epoch's mean loss is the
    # loss of the starting adapters.
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OptimConfig(lr=1e-12, weight_decay=0.0)),
        train,
        label_ids,
        FP32,
        data_seeds=[1, 2],
        batch_size=4,
        kl_beta=beta,
    )
    np.testing.assert_allclose(trainer.train_epoch(0), expected, rtol=1e-5)


def test_beta_kl_is_exactly_zero_at_initialisation_in_bf16(data, monkeypatch):
    """B = 0 makes the fine-tuned model the base model, so β·KL must be 0, not bf16 noise:
    the reference must be computed the way the trained side is (same batch, autocast, head)."""
    tokenizer, train, _, label_ids = data
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), 3)
    ensemble.init_members([0, 1, 2])
    seen = []

    def recording(log_probs, base):
        kl = kl_to_base(log_probs, base)
        seen.append(kl.detach().clone())
        return kl

    monkeypatch.setattr(trainer_module, "kl_to_base", recording)
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OptimConfig(lr=1e-3)),
        train,
        label_ids,
        BF16,
        data_seeds=[1, 2, 3],
        batch_size=4,
        kl_beta=1.0,
    )
    trainer.train_epoch(0)
    first_step = seen[0]
    assert first_step.numel() == 3 * 4 and torch.count_nonzero(first_step) == 0
    assert torch.count_nonzero(torch.cat(seen)) > 0  # later steps moved B, and KL follows


def test_huge_kl_weight_keeps_the_fine_tuned_distribution_at_the_base(data):
    free = train_tiny_ensemble(data, OptimConfig(lr=1e-2, kl_beta=0.0))
    tied = train_tiny_ensemble(data, OptimConfig(lr=1e-2, kl_beta=1e4))
    train = data[1]
    base = _answer_logits(tiny_llama(len(data[0])), train)
    free_kl = _kl_float64(_member_logits(free, 0, train), base).mean().item()
    tied_kl = _kl_float64(_member_logits(tied, 0, train), base).mean().item()
    assert free_kl > 20 * tied_kl


def test_kl_reference_is_the_base_model_even_after_training(data):
    tokenizer, train, _, _ = data
    trained = train_tiny_ensemble(data, OptimConfig(lr=1e-2))
    batch = rows_batch(train, [[i] for i in range(len(train))], pad_id=0, packed=False)
    reference = base_log_probs(trained, batch, FP32)
    expected = torch.log_softmax(_answer_logits(tiny_llama(len(tokenizer)), train), dim=-1)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)


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
    decayed = train_tiny_ensemble(data, OptimConfig(lr=1e-2, weight_decay=50.0, decay_target="B"))
    assert b_norm(decayed) < 0.5 * b_norm(free)

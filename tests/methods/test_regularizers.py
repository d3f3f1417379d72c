"""The paper's regularisers and baselines, each wired so that a mistake would show."""

import numpy as np
import pytest
import torch
from conftest import make_questions, tiny_llama, tiny_tokenizer

import loraens.training.trainer as trainer_module
from loraens.config import OptimConfig, TrainConfig
from loraens.data.batching import collate
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.evaluation.inference import score_members
from loraens.methods.last_layer import LastLayerEnsemble, train_last_layer
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_features
from loraens.runtime import Runtime
from loraens.training.kl import base_log_probs, kl_to_base
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)
BF16 = Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def data():
    tokenizer = tiny_tokenizer()
    train = encode_questions(tokenizer, make_questions(16, seed=5), 256)
    evaluation = encode_questions(tokenizer, make_questions(8, seed=6), 256)
    return tokenizer, train, evaluation, torch.tensor(label_token_ids(tokenizer))


def _trained(data, optim: OptimConfig, epochs=3, dropout=0.0, members=2):
    tokenizer, train, _, label_ids = data
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), members, dropout=dropout)
    ensemble.init_members(list(range(members)))
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, optim),
        train,
        label_ids,
        FP32,
        data_seeds=list(range(10, 10 + members)),
        batch_size=4,
        kl_beta=optim.kl_beta,
    )
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
    return ensemble


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
    free = _trained(data, OptimConfig(lr=1e-2, kl_beta=0.0))
    tied = _trained(data, OptimConfig(lr=1e-2, kl_beta=1e4))
    train = data[1]
    base = _answer_logits(tiny_llama(len(data[0])), train)
    free_kl = _kl_float64(_member_logits(free, 0, train), base).mean().item()
    tied_kl = _kl_float64(_member_logits(tied, 0, train), base).mean().item()
    assert free_kl > 20 * tied_kl


def test_kl_reference_is_the_base_model_even_after_training(data):
    tokenizer, train, _, _ = data
    trained = _trained(data, OptimConfig(lr=1e-2))
    batch = collate(train, [range(len(train))], pad_id=0)
    reference = base_log_probs(trained, batch["input_ids"], batch["lengths"], FP32)
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

    free = _trained(data, OptimConfig(lr=1e-2, weight_decay=0.0))
    decayed = _trained(data, OptimConfig(lr=1e-2, weight_decay=50.0, decay_target="B"))
    assert b_norm(decayed) < 0.5 * b_norm(free)


def test_mc_dropout_passes_differ_with_dropout_and_agree_without(data):
    _, _, evaluation, label_ids = data
    with_dropout = _trained(data, OptimConfig(lr=1e-2), epochs=1, dropout=0.3, members=1)
    passes = score_members(with_dropout, evaluation, label_ids, FP32, mc_dropout_passes=4)
    assert passes.shape[0] == 4
    assert not np.allclose(passes[0], passes[1])
    deterministic = score_members(with_dropout, evaluation, label_ids, FP32)
    assert deterministic.shape[0] == 1

    without = _trained(data, OptimConfig(lr=1e-2), epochs=1, dropout=0.0, members=1)
    passes = score_members(without, evaluation, label_ids, FP32, mc_dropout_passes=3)
    np.testing.assert_allclose(passes[0], passes[2])


def test_mc_dropout_config_requires_dropout():
    with pytest.raises(ValueError, match="lora.dropout"):
        TrainConfig(ensemble=type(TrainConfig().ensemble)(method="mc_dropout"))


def test_last_layer_trains_only_label_rows_with_the_full_vocabulary_loss(data):
    tokenizer, train, evaluation, label_ids = data
    model = tiny_llama(len(tokenizer))
    head_before = model.get_output_embeddings().weight.detach().clone()
    seen = []
    ensemble = train_last_layer(
        model,
        train,
        evaluation,
        label_ids,
        FP32,
        n_members=3,
        data_seeds=[1, 2, 3],
        schedule_seed=None,
        batch_size=4,
        lr=5e-2,
        weight_decay=0.0,
        epochs=3,
        on_epoch=lambda epoch, losses, log_probs: seen.append((losses, log_probs)),
    )
    torch.testing.assert_close(model.get_output_embeddings().weight, head_before)  # untied
    assert len(seen) == 3 and seen[-1][0].mean() < seen[0][0].mean()
    rows = ensemble.rows.detach()
    assert not torch.allclose(rows[0], rows[1])  # members differ by their data order

    # The reported eval log p_T are the trained rows applied to the frozen model's answer
    # position: recomputed from plain Hugging Face hidden states and a float64 softmax over
    # each question's own options.
    with torch.no_grad():
        hidden = torch.stack(
            [
                model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
                for ids in evaluation.input_ids
            ]
        )
    expected = np.full((3, len(evaluation), max(evaluation.n_choices)), -np.inf)
    for m in range(3):
        logits = (hidden @ rows[m].T).double()
        for i, k in enumerate(evaluation.n_choices):
            expected[m, i, :k] = torch.log_softmax(logits[i, :k], dim=-1).numpy()
    np.testing.assert_allclose(seen[-1][1], expected, rtol=1e-5, atol=1e-5)

    # the cached log-sum-exp trick equals cross-entropy over the full vocabulary
    fresh = LastLayerEnsemble(model.get_output_embeddings().weight, label_ids, 1)
    features = answer_features(model, train, FP32)
    logits = features @ model.get_output_embeddings().weight.T
    labels = torch.tensor(train.labels)
    expected = torch.nn.functional.cross_entropy(logits, label_ids[labels], reduction="none")
    label_logits = fresh.label_logits(features[None])[0]
    full = torch.cat([label_logits, fresh.frozen_logsumexp(features)[:, None]], dim=-1)
    ours = full.logsumexp(-1) - label_logits.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

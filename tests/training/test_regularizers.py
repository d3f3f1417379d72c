"""The paper's regularisers and baselines, each wired so that a mistake would show."""

import numpy as np
import pytest
import torch
from conftest import make_questions, tiny_llama, tiny_tokenizer

from loraens.baselines.last_layer import LastLayerEnsemble, train_last_layer
from loraens.config import OptimConfig, TrainConfig
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.evaluation.inference import score_members
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_features, vocab_log_probs
from loraens.runtime import Runtime
from loraens.training.kl import base_log_probs, kl_to_base
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)


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


def _mean_kl_to_base(ensemble, encoded):
    reference = base_log_probs(ensemble, encoded, FP32)
    with ensemble.members(slice(0, 1)):
        features = answer_features(ensemble.model, encoded, FP32)
    with torch.no_grad():
        return kl_to_base(vocab_log_probs(ensemble.model, features), reference).mean().item()


def test_huge_kl_weight_keeps_the_fine_tuned_distribution_at_the_base(data):
    free = _trained(data, OptimConfig(lr=1e-2, kl_beta=0.0))
    tied = _trained(data, OptimConfig(lr=1e-2, kl_beta=1e4))
    train = data[1]
    assert _mean_kl_to_base(free, train) > 20 * _mean_kl_to_base(tied, train)


def test_kl_reference_is_the_base_model_even_after_training(data):
    tokenizer, train, _, _ = data
    trained = _trained(data, OptimConfig(lr=1e-2))
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
    assert seen[-1][1].shape == (3, len(evaluation), max(evaluation.n_choices))
    rows = ensemble.rows.detach()
    assert not torch.allclose(rows[0], rows[1])  # members differ by their data order

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

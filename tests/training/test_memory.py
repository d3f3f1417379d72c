"""Memory-bounded training: passes split to a budget give the one-pass step's gradients, the
activation estimate matches what autograd keeps, and packing leaves training unchanged."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from loraens.config import OptimConfig
from loraens.data.batching import epoch_order
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_hidden_states, vocab_log_probs
from loraens.runtime import Runtime
from loraens.training.memory import (
    HALF_OVERHEAD,
    OVERHEAD,
    activation_bytes_per_token,
    resolve_budget,
    split_passes,
)
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer

UNBOUNDED = Runtime(device=torch.device("cpu"), autocast_dtype=None, memory_budget_gb=1e3)
TINY_BUDGET = dataclasses.replace(UNBOUNDED, memory_budget_gb=1e-4)  # ~12 tokens: 1 row a pass
BATCH = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    tokenizer = tiny_tokenizer()
    encoded = encode_questions(tokenizer, make_questions(12, seed=7), max_length=256)
    return tokenizer, encoded, torch.tensor(label_token_ids(tokenizer))


def _trainer(data, runtime, kl_beta=0.0, members=3):
    tokenizer, encoded, label_ids = data
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), members)
    ensemble.init_members([11, 12, 13][:members])
    with torch.no_grad():  # non-zero B, so A gets a gradient too
        generator = torch.Generator().manual_seed(1)
        for param in ensemble.lora_parameters("B"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OptimConfig(lr=1e-2)),
        encoded,
        label_ids,
        runtime,
        data_seeds=[21, 22, 23][:members],
        batch_size=BATCH,
        kl_beta=kl_beta,
    )


@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
@pytest.mark.parametrize("packing", [True, False])
def test_step_split_into_passes_gives_the_one_pass_gradients(data, kl_beta, packing):
    one = _trainer(data, dataclasses.replace(UNBOUNDED, packing=packing), kl_beta)
    split = _trainer(data, dataclasses.replace(TINY_BUDGET, packing=packing), kl_beta)
    lengths = [len(ids) for ids in data[1].input_ids]
    batches = [epoch_order(lengths, BATCH, seed, 0)[0] for seed in one.data_seeds]
    one.pass_log, split.pass_log = [], []
    losses_one = one._step(batches)
    losses_split = split._step(batches)
    assert len(one.pass_log) == 1
    assert len(split.pass_log) > 3 and all(rows == 1 for rows, _, _ in split.pass_log)
    assert one.tokens_seen == split.tokens_seen == sum(sum(q) for _, _, q in one.pass_log)
    np.testing.assert_allclose(losses_split, losses_one, rtol=1e-5)
    for p_one, p_split in zip(one.params, split.params, strict=True):
        assert p_one.grad.abs().sum() > 0
        torch.testing.assert_close(p_split.grad, p_one.grad, rtol=1e-4, atol=1e-7)


def test_adapters_after_an_epoch_agree_split_packed_or_not(data):
    reference = _trainer(data, dataclasses.replace(UNBOUNDED, packing=False))
    runs = [reference] + [
        _trainer(data, runtime)
        for runtime in (UNBOUNDED, TINY_BUDGET, dataclasses.replace(TINY_BUDGET, packing=False))
    ]
    losses = [trainer.train_epoch(0) for trainer in runs]
    for trainer, loss in zip(runs[1:], losses[1:], strict=True):
        np.testing.assert_allclose(loss, losses[0], rtol=1e-5)
        for m in range(3):
            for key, value in reference.ensemble.member_state_dict(m).items():
                torch.testing.assert_close(
                    trainer.ensemble.member_state_dict(m)[key], value, rtol=1e-4, atol=1e-5
                )
    # packing processed fewer tokens than padding every question to the longest
    assert runs[1].tokens_processed < reference.tokens_processed


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_estimate_matches_what_autograd_keeps(dtype):
    """Bytes saved for backward, counted with saved-tensor hooks, against the formula."""
    h, f, layers, rows, length = 128, 320, 2, 3, 96
    config = LlamaConfig(
        vocab_size=500, hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)  # half weights: no autocast weight copies among the saved
    ensemble = LoRAEnsemble(model, 2)
    ensemble.init_members([1, 2])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 500, (rows * 2, length))
    positions = torch.arange(length).remainder(length // 3).expand(rows * 2, -1)  # packed
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        vocab_log_probs(model, answer_hidden_states(model, ids, torch.full((6,), 5), positions))
    measured = sum(saved.values()) / ids.numel()
    estimate = activation_bytes_per_token(config, dtype)
    overhead = OVERHEAD if dtype is None else HALF_OVERHEAD
    assert estimate / overhead * 0.9 < measured < estimate


def test_split_passes_stays_within_budget():
    assert split_passes(5, 4, 100, 1e9, None) == (5, 4)
    assert split_passes(5, 4, 100, 1000, None) == (5, 2)
    assert split_passes(5, 4, 100, 1000, 2) == (2, 4)
    assert split_passes(5, 4, 100, 250, None) == (2, 1)
    assert split_passes(5, 4, 100, 10, None) == (1, 1)  # the floor: one row of one member
    for members, rows, width, budget in [(3, 7, 50, 400), (8, 2, 300, 2500), (1, 9, 20, 100)]:
        m, r = split_passes(members, rows, width, budget, None)
        assert m * r * width <= budget and 1 <= m <= members and 1 <= r <= rows


def test_memory_budget_resolution():
    cpu = torch.device("cpu")
    assert resolve_budget(2.5, cpu) == 2.5e9
    auto = resolve_budget(None, cpu)
    assert 0 < auto <= 1e9

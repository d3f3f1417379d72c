import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

from loraens.config import OptimConfig
from loraens.data.batching import collate, epoch_order
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime
from loraens.training.optim import build_optimizer
from loraens.training.seeds import member_seeds
from loraens.training.trainer import EnsembleTrainer

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.01)
EPOCHS, BATCH = 2, 4


@pytest.fixture(scope="module")
def data():
    tokenizer = tiny_tokenizer()
    encoded = encode_questions(tokenizer, make_questions(10, seed=3), max_length=256)
    return tokenizer, encoded, torch.tensor(label_token_ids(tokenizer))


def _train(data, n_members, members_per_pass, init_seeds, data_seeds, schedule=None):
    tokenizer, encoded, label_ids = data
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members)
    ensemble.init_members(init_seeds)
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OPTIM),
        encoded,
        label_ids,
        FP32,
        data_seeds=data_seeds,
        batch_size=BATCH,
        members_per_pass=members_per_pass,
        schedule_seed=schedule,
    )
    losses = [trainer.train_epoch(epoch) for epoch in range(EPOCHS)]
    return ensemble, losses


@pytest.mark.parametrize("schedule", [None, 123], ids=["shuffle", "length-grouped"])
def test_stacked_training_equals_members_trained_alone(data, schedule):
    init, order = member_seeds(0, 3, "init"), member_seeds(0, 3, "data")
    stacked, stacked_losses = _train(data, 3, None, init, order, schedule)
    grouped, _ = _train(data, 3, 2, init, order, schedule)  # groups of 2 + 1
    for m in range(3):
        alone, alone_losses = _train(data, 1, None, init[m : m + 1], order[m : m + 1], schedule)
        for key, value in alone.member_state_dict(0).items():
            torch.testing.assert_close(
                stacked.member_state_dict(m)[key], value, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                grouped.member_state_dict(m)[key], value, rtol=1e-4, atol=1e-5
            )
        for epoch in range(EPOCHS):
            assert stacked_losses[epoch][m] == pytest.approx(alone_losses[epoch][0], rel=1e-5)
    # training moved every member, and differently
    b = [
        stacked.member_state_dict(m)[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ]
        for m in range(3)
    ]
    assert all(torch.count_nonzero(x) > 0 for x in b) and not torch.allclose(b[0], b[1])


def test_member_matches_a_plain_peft_training_loop(data):
    """The reference a user would write: PEFT LoRA, full-sequence logits, one member at a time."""
    tokenizer, encoded, label_ids = data
    init, order = member_seeds(4, 2, "init"), member_seeds(4, 2, "data")
    ours, _ = _train(data, 2, None, init, order)

    member = 1
    reference = LoRAEnsemble(tiny_llama(len(tokenizer)), 2)
    reference.init_members(init)  # only to copy member 1's initial A into PEFT
    peft_model = get_peft_model(
        tiny_llama(len(tokenizer)),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for key, value in reference.member_state_dict(member).items():
            name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            peft_model.base_model.model.get_parameter(name).copy_(value)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay)
    peft_model.train()
    for epoch in range(EPOCHS):
        lengths = [len(ids) for ids in encoded.input_ids]
        for batch in epoch_order(lengths, BATCH, order[member], epoch):
            inputs = collate(encoded, [batch], pad_id=0)
            logits = peft_model(input_ids=inputs["input_ids"]).logits
            answer = logits[torch.arange(len(batch)), inputs["lengths"] - 1]
            loss = F.cross_entropy(answer, label_ids[inputs["labels"]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    for key, value in ours.member_state_dict(member).items():
        name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        expected = peft_model.base_model.model.get_parameter(name)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-4, atol=1e-5)


def test_switching_off_diversity_sources(data):
    init = member_seeds(0, 3, "init", vary=False)
    order = member_seeds(0, 3, "data", vary=False)
    same, _ = _train(data, 3, None, init, order)
    for key, value in same.member_state_dict(0).items():
        torch.testing.assert_close(same.member_state_dict(2)[key], value, rtol=1e-5, atol=1e-7)
    assert len(set(member_seeds(0, 3, "init"))) == 3
    assert member_seeds(0, 3, "init") != member_seeds(0, 3, "data")
    assert member_seeds(0, 5, "data")[:3] == member_seeds(0, 3, "data")

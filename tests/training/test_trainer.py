import contextlib

import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

from loraens.config import OptimConfig
from loraens.data.batching import collate, epoch_order
from loraens.data.packing import plan_rows
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.models.loading import cast_parameters, matmul_weights
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


def _train(
    data,
    n_members,
    members_per_pass,
    init_seeds,
    data_seeds,
    schedule=None,
    optim=OPTIM,
    runtime=FP32,
    dropout=0.0,
    rng_seed=None,
    matmul_dtype=torch.float32,
):
    tokenizer, encoded, label_ids = data
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members, dropout=dropout)
    cast_parameters(matmul_weights(ensemble.model), matmul_dtype)  # model.dtype auto's layout
    ensemble.init_members(init_seeds)
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, optim),
        encoded,
        label_ids,
        runtime,
        data_seeds=data_seeds,
        batch_size=BATCH,
        members_per_pass=members_per_pass,
        schedule_seed=schedule,
        kl_beta=optim.kl_beta,
    )
    if rng_seed is not None:  # the global generator draws the dropout masks
        torch.manual_seed(rng_seed)
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


# The dropout and bf16 variants run our trainer unpacked, one padded row per question as the
# PEFT loop has them: dropout masks come from the same generator only over the same (rows,
# tokens) layout, and bf16 rounding depends on the layout too. Packed = unpacked is tested in
# tests/data/test_packing.py.
FP32_UNPACKED = Runtime(device=torch.device("cpu"), autocast_dtype=None, packing=False)
BF16 = Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16, packing=False)
# name: (optim, runtime, dropout, (rtol, atol) on the final adapters)
PEFT_VARIANTS = {
    "plain": (OPTIM, FP32, 0.0, (1e-4, 1e-5)),
    "kl": (OptimConfig(lr=1e-2, weight_decay=0.01, kl_beta=0.5), FP32, 0.0, (1e-4, 1e-5)),
    "b_decay": (OptimConfig(lr=1e-2, weight_decay=20.0, decay_target="B"), FP32, 0.0, (1e-4, 1e-5)),
    "dropout": (OPTIM, FP32_UNPACKED, 0.2, (1e-4, 1e-5)),
    # bf16 may round differently in the two loops (answer-row head vs full-sequence logits),
    # and AdamW's normalised steps can turn a tiny gradient difference into an lr-sized one on
    # an entry whose gradient is near zero: allow a tenth of one step (lr = 1e-2). Measured on
    # the 2-core AMD EPYC CPU: identical (0.0); fp32 variants differ by at most 4.4e-7.
    "bf16": (OPTIM, BF16, 0.0, (0.0, 1e-3)),
    # model.dtype auto under bf16: the decoder's linear weights held in bf16, no per-pass cast.
    "bf16_weights": (OPTIM, BF16, 0.0, (0.0, 1e-3)),
}


@pytest.mark.parametrize("variant", PEFT_VARIANTS)
def test_member_matches_a_plain_peft_training_loop(data, variant):
    """The reference a user would write: PEFT LoRA, full-sequence logits, one member at a time,
    with the variant's KL term, decay groups, dropout or bf16 autocast written out by hand."""
    optim, runtime, dropout, (rtol, atol) = PEFT_VARIANTS[variant]
    tokenizer, encoded, label_ids = data
    # One member for dropout, so both loops draw the same masks from the same generator state.
    n_members, member = (1, 0) if dropout else (2, 1)
    init, order = member_seeds(4, n_members, "init"), member_seeds(4, n_members, "data")
    matmul = torch.bfloat16 if variant == "bf16_weights" else torch.float32
    ours, _ = _train(data, n_members, None, init, order, None, optim, runtime, dropout, 123, matmul)

    reference = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members)
    reference.init_members(init)  # only to copy the member's initial A into PEFT
    peft_model = get_peft_model(
        tiny_llama(len(tokenizer)),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=dropout),
    )
    with torch.no_grad():
        for key, value in reference.member_state_dict(member).items():
            name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            peft_model.base_model.model.get_parameter(name).copy_(value)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    decay = {"all": ("lora_A", "lora_B"), "A": ("lora_A",), "B": ("lora_B",)}[optim.decay_target]
    groups = [
        {
            "params": [p for n, p in named if which in n],
            "weight_decay": optim.weight_decay if which in decay else 0.0,
        }
        for which in ("lora_A", "lora_B")
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, foreach=False)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if runtime is BF16 else contextlib.nullcontext()
    )
    torch.manual_seed(123)
    peft_model.train()
    for epoch in range(EPOCHS):
        lengths = [len(ids) for ids in encoded.input_ids]
        for batch in epoch_order(lengths, BATCH, order[member], epoch):
            # Our trainer lays a batch's questions out in plan_rows' order; the mean loss does not
            # depend on it, but which question gets which dropout mask does.
            batch = [i for row in plan_rows([batch], lengths, None)[0] for i in row]
            inputs = collate(encoded, [batch], pad_id=0)
            rows = torch.arange(len(batch)), inputs["lengths"] - 1
            # The same layout as ours: right-padded to its width multiple (64 on CPU in bf16).
            ids = inputs["input_ids"]
            ids = F.pad(ids, (0, -ids.shape[1] % runtime.width_multiple))
            with autocast:
                answer = peft_model(input_ids=ids).logits[rows].float()
            loss = F.cross_entropy(answer, label_ids[inputs["labels"]])
            if optim.kl_beta:
                with torch.no_grad(), peft_model.disable_adapter():
                    base = peft_model(input_ids=inputs["input_ids"]).logits[rows].float()
                log_p, log_q = F.log_softmax(answer, -1), F.log_softmax(base, -1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(fine-tuned || base)
                loss = loss + optim.kl_beta * kl.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    for key, value in ours.member_state_dict(member).items():
        name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        expected = peft_model.base_model.model.get_parameter(name).detach()
        torch.testing.assert_close(value, expected, rtol=rtol, atol=atol)
    b = ours.member_state_dict(member)
    b = b["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert b.abs().max() > 10 * atol  # trained far beyond the tolerance


def test_switching_off_diversity_sources(data):
    init = member_seeds(0, 3, "init", vary=False)
    order = member_seeds(0, 3, "data", vary=False)
    same, _ = _train(data, 3, None, init, order)
    for key, value in same.member_state_dict(0).items():
        torch.testing.assert_close(same.member_state_dict(2)[key], value, rtol=1e-5, atol=1e-7)
    assert len(set(member_seeds(0, 3, "init"))) == 3
    assert member_seeds(0, 3, "init") != member_seeds(0, 3, "data")
    assert member_seeds(0, 5, "data")[:3] == member_seeds(0, 3, "data")


def test_rows_padded_to_a_width_multiple_train_the_same_members(data, monkeypatch):
    """CPU half precision pads every pass to a multiple of 64 positions (Runtime.width_multiple,
    oneDNN's kernel cache); padding is masked, so in fp32 the members come out the same."""
    init, order = member_seeds(0, 2, "init"), member_seeds(0, 2, "data")
    plain, plain_losses = _train(data, 2, None, init, order)
    import loraens.training.trainer as trainer_module

    widths = []
    original = trainer_module.rows_batch

    def spy(*args, **kwargs):
        batch = original(*args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(trainer_module, "rows_batch", spy)
    monkeypatch.setattr(Runtime, "width_multiple", property(lambda self: 64))
    padded, padded_losses = _train(data, 2, None, init, order)
    assert widths and all(w % 64 == 0 for w in widths)
    for m in range(2):
        for key, value in plain.member_state_dict(m).items():
            torch.testing.assert_close(
                padded.member_state_dict(m)[key], value, rtol=1e-4, atol=1e-5
            )
    for before, after in zip(plain_losses, padded_losses, strict=True):
        assert after == pytest.approx(before, rel=1e-5)


def test_width_multiple_is_64_only_for_half_precision_on_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Runtime(cpu, torch.bfloat16).width_multiple == 64
    assert Runtime(cpu, torch.float16).width_multiple == 64
    assert Runtime(cpu, None).width_multiple == 1
    assert Runtime(cuda, torch.bfloat16).width_multiple == 1

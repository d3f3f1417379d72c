import math

import pytest
import torch
from helpers import tiny_llama
from peft import PeftModel

from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import AdapterError, load_members, save_member

VOCAB = 99


def _randomize_b(ensemble: LoRAEnsemble, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ensemble.lora_parameters("B"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_wraps_only_query_and_value_projections():
    ensemble = LoRAEnsemble(tiny_llama(VOCAB), n_members=3)
    names = sorted(ensemble.lora_layers)
    expected = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert names == expected
    trainable = [n for n, p in ensemble.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable) and len(trainable) == 2 * len(names)


def test_member_initialisation_is_peft_default_and_independent_of_ensemble_size():
    big = LoRAEnsemble(tiny_llama(VOCAB), n_members=3)
    big.init_members([11, 22, 33])
    alone = LoRAEnsemble(tiny_llama(VOCAB), n_members=1)
    alone.init_members([22])
    for name, layer in big.lora_layers.items():
        torch.testing.assert_close(layer.lora_A[1], alone.lora_layers[name].lora_A[0])
        assert torch.count_nonzero(layer.lora_B) == 0
        # Kaiming-uniform with a = sqrt(5) is uniform on ±1/sqrt(fan_in).
        bound = 1 / math.sqrt(layer.lora_A.shape[-1])
        assert layer.lora_A.abs().max() <= bound
        assert layer.lora_A.abs().max() > 0.8 * bound
        assert not torch.equal(layer.lora_A[0], layer.lora_A[1])


def test_stacked_forward_equals_each_member_alone():
    ensemble = LoRAEnsemble(tiny_llama(VOCAB), n_members=3)
    ensemble.init_members([1, 2, 3])
    _randomize_b(ensemble)
    inputs = torch.randint(2, VOCAB, (3 * 2, 7))
    with torch.no_grad():
        stacked = ensemble.model(input_ids=inputs).logits
        for m in range(3):
            with ensemble.members(slice(m, m + 1)):
                alone = ensemble.model(input_ids=inputs[2 * m : 2 * m + 2]).logits
            torch.testing.assert_close(stacked[2 * m : 2 * m + 2], alone, rtol=1e-5, atol=1e-5)


def test_exported_member_loads_in_plain_peft_with_identical_logits(tmp_path):
    ensemble = LoRAEnsemble(tiny_llama(VOCAB), n_members=2)
    ensemble.init_members([5, 6])
    _randomize_b(ensemble)
    save_member(ensemble, 1, tmp_path / "member-01", base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "member-01").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    peft_model = PeftModel.from_pretrained(tiny_llama(VOCAB), tmp_path / "member-01").eval()
    inputs = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad(), ensemble.members(slice(1, 2)):
        ours = ensemble.model(input_ids=inputs).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = tiny_llama(VOCAB)(input_ids=inputs).logits
    assert not torch.allclose(base, ours, atol=1e-3)  # the adapter really changes the output


def test_adapters_round_trip_and_mismatch_is_reported(tmp_path):
    source = LoRAEnsemble(tiny_llama(VOCAB), n_members=2)
    source.init_members([7, 8])
    _randomize_b(source)
    folders = [tmp_path / f"m{m}" for m in range(2)]
    for m, folder in enumerate(folders):
        save_member(source, m, folder, base_model="tiny")
    target = LoRAEnsemble(tiny_llama(VOCAB), n_members=2)
    load_members(target, folders)
    for m in range(2):
        for key, value in source.member_state_dict(m).items():
            torch.testing.assert_close(target.member_state_dict(m)[key], value)

    other_rank = LoRAEnsemble(tiny_llama(VOCAB), n_members=1, rank=4)
    with pytest.raises(AdapterError, match="shape"):
        load_members(other_rank, folders[:1])
    deeper = LoRAEnsemble(tiny_llama(VOCAB, num_hidden_layers=3), n_members=1)
    with pytest.raises(AdapterError, match="missing"):
        load_members(deeper, folders[:1])

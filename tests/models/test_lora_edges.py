"""EnsembleLoRALinear on its own: PEFT's initialisation bound, mixed base/adapter dtypes against
a float32 computation by hand, and the error for target modules that match nothing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from loraens.models.lora import EnsembleLoRALinear, LoRAEnsemble


def test_reset_member_draws_a_within_the_kaiming_bound_and_zeroes_b():
    # Kaiming-uniform with a = sqrt(5): gain sqrt(2 / (1 + 5)) = sqrt(1/3), bound
    # gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in) = 1/16 for fan_in = 256. With 64 * 256 draws the
    # largest |A| is within 1% of the bound (P(all below 0.99 bound) = 0.99^16384 ~ 1e-72), while
    # a = sqrt(6) would cap it at sqrt(6/7) ~ 0.926 of the bound.
    layer = EnsembleLoRALinear(nn.Linear(256, 16), n_members=2, rank=64, alpha=16.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)  # reset must zero B, not rely on its construction
    layer.reset_member(0, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(256)
    a = layer.lora_A[0].detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound
    # Uniform on [-bound, bound]: mean |A| = bound / 2.
    assert a.abs().mean().item() == pytest.approx(bound / 2, rel=0.02)
    assert torch.count_nonzero(layer.lora_B[0]) == 0
    # Member 1 was not reset: its A is still the zeros it was built with, its B still ones.
    assert torch.count_nonzero(layer.lora_A[1]) == 0
    assert torch.all(layer.lora_B[1] == 1.0)


def _reference(x, base, lora_a, lora_b, scaling, n_members):
    """x @ W^T + b + scaling * x @ A_m^T @ B_m^T per member's block of rows, in float32."""
    xf, w, b = x.float(), base.weight.float(), base.bias.float()
    blocks = xf.reshape(n_members, -1, *xf.shape[1:])
    out = [
        blk @ w.T + b + scaling * (blk @ lora_a[m].float().T) @ lora_b[m].float().T
        for m, blk in enumerate(blocks)
    ]
    return torch.cat(out)


def test_bf16_base_with_float32_adapters_matches_a_float32_computation():
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(torch.bfloat16)
    layer = EnsembleLoRALinear(base, n_members=2, rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.3)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(2 * 3, 5, 32).to(torch.bfloat16)  # rows 0-2: member 0, rows 3-5: member 1
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert out.shape == (6, 5, 24)
    expected = _reference(x, base, layer.lora_A, layer.lora_B, 8.0 / 4, 2)
    update = expected - (x.float() @ base.weight.float().T + base.bias.float())
    assert update.abs().mean() > 0.5  # the adapters really contribute
    # bf16 keeps 8 significant bits: relative rounding ~4e-3 per operation.
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def test_float32_layer_matches_the_float32_computation_exactly():
    torch.manual_seed(1)
    base = nn.Linear(12, 10)
    layer = EnsembleLoRALinear(base, n_members=3, rank=2, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape))
    x = torch.randn(3 * 2, 4, 12)
    with torch.no_grad():
        out = layer(x)
    expected = _reference(x, base, layer.lora_A, layer.lora_B, 6.0 / 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _list_pattern(names: tuple[str, ...]) -> str:
    """Python's repr of ``list(names)`` (``['a', 'b']``) as a regular expression."""
    return r"\[" + ", ".join(f"'{n}'" for n in names) + r"\]"


@pytest.mark.parametrize(
    "targets",
    [("nope",), ("self_attn",), ("embed_tokens",)],
    ids=["no-such-name", "not-a-linear", "embedding"],
)
def test_target_modules_that_match_no_linear_are_reported(targets):
    names = _list_pattern(targets)
    with pytest.raises(
        ValueError,
        match=rf"^No nn\.Linear module named any of {names} in LlamaForCausalLM; "
        r"set lora\.target_modules",
    ):
        LoRAEnsemble(tiny_llama(99), n_members=2, target_modules=targets)

"""M LoRA members on one frozen base model, trained and evaluated in one stacked pass.

A forward pass carries a batch whose rows are grouped by member: rows ``[g*b, (g+1)*b)`` belong
to the g-th active member. Every wrapped projection runs the frozen base matmul once over all
rows, then adds each member's own low-rank update ``(alpha/r) * B_m A_m x`` to that member's
rows only (the approach of mLoRA and LoRA-Ensemble). Members therefore never see each other's
data or gradients, yet share one copy of the base weights and one large matmul.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel


def peft_member_state(stacked: dict[str, torch.Tensor], member: int) -> dict[str, torch.Tensor]:
    """One member's slice of :meth:`LoRAEnsemble.stacked_adapters`-shaped tensors, under the key
    names PEFT uses in adapter files (A and B: a variational member's scale is not PEFT's)."""
    return {
        f"base_model.model.{key}.weight": tensor[member].float().contiguous()
        for key, tensor in stacked.items()
        if not key.endswith(".lora_G")
    }


class EnsembleLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one low-rank update per ensemble member."""

    def __init__(self, base: nn.Linear, n_members: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        # Stored as (member, rank, in) and (member, out, rank): member m's slices are exactly
        # PEFT's lora_A.weight and lora_B.weight, so export is a plain slice.
        self.lora_A = nn.Parameter(torch.zeros(n_members, rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n_members, base.out_features, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = slice(None)
        self.enabled = True
        # Called with (layer, A's input, A's output, B's input, B's output) when set: how a
        # posterior reads per-token inputs and, through tensor hooks, output gradients.
        self.probe: Callable[..., None] | None = None
        # BLoB (loraens.training.blob): A ~ N(lora_A, (lora_G²)²) elementwise, sampled in
        # training mode only; None for a plain LoRA layer.
        self.lora_G: nn.Parameter | None = None
        self.blob_eps = 0.0

    def make_variational(self, eps: float) -> None:
        """Give A a learned elementwise scale Ω = G² (BLoB), G drawn in [ε/√2, ε] per member."""
        self.lora_G = nn.Parameter(torch.zeros_like(self.lora_A))
        self.blob_eps = eps

    def reset_member(self, member: int, generator: torch.Generator) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt 5), B zero, so ΔW starts at 0."""
        with torch.no_grad():
            a = torch.empty_like(self.lora_A[member])
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A[member].copy_(a)
            self.lora_B[member].zero_()
            if self.lora_G is not None:  # the same member's stream: independent of M as well
                g = torch.empty_like(self.lora_G[member])
                g.uniform_(self.blob_eps / math.sqrt(2), self.blob_eps, generator=generator)
                self.lora_G[member].copy_(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        lora_A = self.lora_A[self.active]
        lora_B = self.lora_B[self.active]
        n_active = lora_A.shape[0]
        rows = x.reshape(n_active, -1, x.shape[-1])  # (members, rows·tokens, in)
        rows = self.dropout(rows)
        a_out = torch.bmm(rows, lora_A.transpose(1, 2).to(rows.dtype))
        if self.lora_G is not None and self.training:
            a_out = a_out + self._flipout_noise(rows, a_out.shape)
        # Scaled at rank r, not at the output width (24-72x fewer elements for SmolLM2, forward
        # and backward); exact for a power-of-two alpha/r such as the paper's 32/8.
        low_rank = a_out * self.scaling
        update = torch.bmm(low_rank, lora_B.transpose(1, 2).to(low_rank.dtype))
        if self.probe is not None:
            self.probe(self, rows, a_out, low_rank, update)
        return out + update.reshape(out.shape).to(out.dtype)

    def _flipout_noise(self, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(x ⊙ s) (Ω ⊙ E)ᵀ ⊙ r: one draw E of each member's A noise per pass, decorrelated
        across tokens by random signs s, r (flipout, as BLoB's code); every draw comes from
        torch's global generator, which checkpoints save, so a resumed run draws the same."""
        assert self.lora_G is not None
        omega = self.lora_G[self.active].square()
        noise = omega * torch.randn_like(omega)
        sign_in = torch.empty_like(rows).bernoulli_(0.5).mul_(2).sub_(1)
        sign_out = torch.empty(shape, dtype=rows.dtype, device=rows.device)
        sign_out = sign_out.bernoulli_(0.5).mul_(2).sub_(1)
        return torch.bmm(rows * sign_in, noise.transpose(1, 2).to(rows.dtype)) * sign_out


class LoRAEnsemble(nn.Module):
    """Wraps a causal LM: its target projections become :class:`EnsembleLoRALinear` layers."""

    def __init__(
        self,
        model: PreTrainedModel,
        n_members: int,
        rank: int = 8,
        alpha: float = 32.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
    ):
        super().__init__()
        model.requires_grad_(False)  # one frozen base serves every member
        self.model = model
        self.n_members = n_members
        self.rank = rank
        self.alpha = alpha
        self.target_modules = tuple(target_modules)
        self.lora_layers: dict[str, EnsembleLoRALinear] = {}
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in self.target_modules and isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                layer = EnsembleLoRALinear(module, n_members, rank, alpha, dropout)
                setattr(parent, child, layer)
                self.lora_layers[name] = layer
        if not self.lora_layers:
            raise ValueError(
                f"No nn.Linear module named any of {list(self.target_modules)} in "
                f"{type(model).__name__}; set lora.target_modules to its attention projections."
            )

    def init_members(self, seeds: Sequence[int]) -> None:
        """Initialise member m from ``seeds[m]`` alone, so a member never depends on M."""
        for member, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            for layer in self.lora_layers.values():
                layer.reset_member(member, generator)

    def base_parameters(self) -> list[nn.Parameter]:
        """The frozen base model's parameters (every parameter but the members' own)."""
        own = {id(p) for which in ("A", "B", "G") for p in self.lora_parameters(which)}
        return [p for p in self.model.parameters() if id(p) not in own]

    def lora_parameters(self, which: str) -> list[nn.Parameter]:
        """The stacked ``lora_A``, ``lora_B`` or (BLoB) ``lora_G`` tensors of every wrapped
        layer (no ``lora_G`` for a plain ensemble)."""
        found = [getattr(layer, f"lora_{which}") for layer in self.lora_layers.values()]
        return [p for p in found if p is not None]

    @property
    def variational(self) -> bool:
        return any(layer.lora_G is not None for layer in self.lora_layers.values())

    def make_variational(self, eps: float) -> None:
        """Every member's A becomes a Gaussian (BLoB, :mod:`loraens.training.blob`)."""
        for layer in self.lora_layers.values():
            layer.make_variational(eps)

    def variational_kl(self, prior_sigma: float) -> torch.Tensor:
        """(members,) KL(q(A) ‖ N(0, σ_p²)) of each member over every A entry, float64."""
        total = None
        for layer in self.lora_layers.values():
            assert layer.lora_G is not None, "a plain LoRA ensemble has no distribution over A"
            sigma = layer.lora_G.double().square()
            mean = layer.lora_A.double()
            kl = (
                math.log(prior_sigma)
                - torch.log(sigma)
                + (sigma.square() + mean.square()) / (2 * prior_sigma**2)
                - 0.5
            )
            kl = kl.flatten(1).sum(1)
            total = kl if total is None else total + kl
        assert total is not None
        return total

    def variational_draws(self, samples: int, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """``samples`` weight draws A = μ + Ω ⊙ E of every member, as A and B tensors of
        (members · samples) members, member-major (for :meth:`adapters`); member m's noise
        comes from ``seeds[m]`` alone, so it does not depend on the other members."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        drawn = {}
        for name, layer in sorted(self.lora_layers.items()):
            assert layer.lora_G is not None
            mean, omega = layer.lora_A.detach(), layer.lora_G.detach().square()
            noise = torch.stack(
                [torch.randn((samples, *mean.shape[1:]), generator=g) for g in generators]
            )
            a = mean[:, None] + omega[:, None] * noise.to(mean.device)
            drawn[f"{name}.lora_A"] = a.reshape(-1, *mean.shape[1:])
            drawn[f"{name}.lora_B"] = layer.lora_B.detach().repeat_interleave(samples, dim=0)
        return drawn

    @contextmanager
    def members(self, active: slice) -> Iterator[None]:
        """Run the wrapped model with only the members in ``active`` (a contiguous slice)."""
        previous = [layer.active for layer in self.lora_layers.values()]
        for layer in self.lora_layers.values():
            layer.active = active
        try:
            yield
        finally:
            for layer, prev in zip(self.lora_layers.values(), previous, strict=True):
                layer.active = prev

    @contextmanager
    def probed(self, probe: Callable[..., None]) -> Iterator[None]:
        """Call ``probe(layer_name, A's input, A's output, B's input, B's output)`` from every
        wrapped layer's forward, each tensor (active members, rows·tokens, width)."""
        for name, layer in self.lora_layers.items():
            layer.probe = functools.partial(probe, name)
        try:
            yield
        finally:
            for layer in self.lora_layers.values():
                layer.probe = None

    @contextmanager
    def adapters(self, stacked: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run with other members in place of the saved ones: ``stacked`` maps every
        ``{layer}.lora_A`` / ``.lora_B`` (as :meth:`stacked_adapters` names them) to a tensor
        of any member count, e.g. S weight samples of each of M members as M·S members."""
        saved = {k: v for k, v in self.stacked_adapters().items() if not k.endswith(".lora_G")}
        if set(stacked) != set(saved):
            raise ValueError("adapters must give lora_A and lora_B of every wrapped layer")
        scales = [layer.lora_G for layer in self.lora_layers.values()]
        previous = (
            self.n_members,
            [(layer.lora_A, layer.lora_B) for layer in self.lora_layers.values()],
        )
        counts = {tensor.shape[0] for tensor in stacked.values()}
        if len(counts) != 1:
            raise ValueError(f"adapters disagree on the member count: {sorted(counts)}")
        for name, layer in self.lora_layers.items():
            layer.lora_A = nn.Parameter(stacked[f"{name}.lora_A"], requires_grad=False)
            layer.lora_B = nn.Parameter(stacked[f"{name}.lora_B"], requires_grad=False)
            layer.lora_G = None  # the given members are weights, not distributions
        self.n_members = counts.pop()
        try:
            yield
        finally:
            self.n_members = previous[0]
            for layer, scale in zip(self.lora_layers.values(), scales, strict=True):
                layer.lora_G = scale
            for layer, (lora_A, lora_B) in zip(self.lora_layers.values(), previous[1], strict=True):
                layer.lora_A, layer.lora_B = lora_A, lora_B

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the plain base model (ΔW = 0 for every row), e.g. for the KL reference."""
        for layer in self.lora_layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.lora_layers.values():
                layer.enabled = True

    @contextmanager
    def dropout_active(self) -> Iterator[None]:
        """Keep adapter dropout sampling in eval mode: MC dropout's stochastic passes."""
        previous = [layer.dropout.training for layer in self.lora_layers.values()]
        for layer in self.lora_layers.values():
            layer.dropout.train(True)
        try:
            yield
        finally:
            for layer, mode in zip(self.lora_layers.values(), previous, strict=True):
                layer.dropout.train(mode)

    def stacked_adapters(self) -> dict[str, torch.Tensor]:
        """Every member's A and B (and a BLoB member's scale G), stacked by member, as
        ``{layer}.lora_A`` / ``.lora_B`` / ``.lora_G`` (detached views of the parameters)."""
        return {
            f"{name}.lora_{which}": getattr(layer, f"lora_{which}").detach()
            for name, layer in self.lora_layers.items()
            for which in ("A", "B", "G")
            if getattr(layer, f"lora_{which}") is not None
        }

    def member_state_dict(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s weights under the key names PEFT uses in adapter files."""
        return peft_member_state(self.stacked_adapters(), member)

    def load_member_scales(self, member: int, scales: dict[str, torch.Tensor]) -> None:
        """A BLoB member's G of every layer, keyed ``{layer}.lora_G`` (as saved beside its
        PEFT adapter, :data:`loraens.models.peft_io.BLOB_SCALES`)."""
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                assert layer.lora_G is not None
                layer.lora_G[member].copy_(scales[f"{name}.lora_G"])

    def load_member_state_dict(self, member: int, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.member_state_dict(member))
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"Adapter does not fit this model: {len(missing)} missing tensors "
                f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected "
                f"(e.g. {sorted(unexpected)[:2]})."
            )
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                prefix = f"base_model.model.{name}"
                for which in ("A", "B"):
                    target = getattr(layer, f"lora_{which}")[member]
                    tensor = state[f"{prefix}.lora_{which}.weight"]
                    if tensor.shape != target.shape:
                        raise ValueError(
                            f"Adapter tensor {prefix}.lora_{which}.weight has shape "
                            f"{tuple(tensor.shape)}, this model needs {tuple(target.shape)} "
                            f"(different base model or rank)."
                        )
                    target.copy_(tensor)

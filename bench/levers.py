"""Levers on the training step, each timed on its own (issue 16's list), fwd + bwd, and how
steady the machine's matmul rate is:

    .venv/bin/python bench/levers.py attention --rows 15 --widths 128,240,480
    .venv/bin/python bench/levers.py compile --rows 5 --widths 240
    .venv/bin/python bench/levers.py compile --rows 5 --widths 240,200,160 --dynamic
    .venv/bin/python bench/levers.py matmul --calls 1,5,20 --windows 12

``attention`` times scaled_dot_product_attention forward + backward at SmolLM2-135M's head shapes
(9 heads of 64), flash against math backend, with the block-diagonal causal mask of packed rows
(questions of ``--segment`` tokens) and with plain causal attention.

``compile`` times one training pass of the stacked-LoRA decoder (M = ``--rows`` members, one
packed row each, fp32, the real default model) eager and under ``torch.compile`` (inductor),
at each of ``--widths`` in turn with one compiled module; the first pass at each width (the
compilation, or a recompilation) is reported apart from the median of the next ones.

``matmul`` times windows of back-to-back 2048² fp32 matmuls (``--calls`` matmuls per window)
and prints each window's GFLOP/s: on a shared VM their spread is the noise in any one
"matmul peak".

Medians of the timed repeats; run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next ``repeats``)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def attention(args: argparse.Namespace) -> None:
    for width in (int(w) for w in args.widths.split(",")):
        shape = (args.rows, 9, width, 64)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        segment = torch.arange(width) // args.segment
        packed = (segment[:, None] == segment[None, :]) & torch.ones(width, width).bool().tril()
        for name, backend, kwargs in [
            ("flash, packed mask", SDPBackend.FLASH_ATTENTION, {"attn_mask": packed}),
            ("math, packed mask", SDPBackend.MATH, {"attn_mask": packed}),
            ("flash, causal", SDPBackend.FLASH_ATTENTION, {"is_causal": True}),
            ("math, causal", SDPBackend.MATH, {"is_causal": True}),
        ]:

            def step(backend=backend, kwargs=kwargs, qkv=(q, k, v)) -> None:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(*qkv, **kwargs).sum().backward()

            _, median = timed(step, args.repeats)
            print(f"rows {args.rows} width {width} {name}: {median * 1000:.1f} ms", flush=True)


def compile_(args: argparse.Namespace) -> None:
    from loraens.models.loading import default_model_dir, load_base_model
    from loraens.models.lora import LoRAEnsemble

    torch.manual_seed(0)
    model = load_base_model(str(default_model_dir())).model.float()
    ensemble = LoRAEnsemble(model, n_members=args.rows)
    ensemble.init_members(list(range(args.rows)))
    for layer in ensemble.lora_layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # B = 0 would leave A without gradient
    decoder = model.get_decoder()
    widths = [int(w) for w in args.widths.split(",")]
    for mode in ("eager", "compile"):
        forward = decoder if mode == "eager" else torch.compile(decoder, dynamic=args.dynamic)
        # One compiled module over every width, in order: the first pass at a new width shows
        # whether it recompiles (static shapes do; dynamic ones should not after the first).
        for width in widths:
            ids = torch.randint(0, model.config.vocab_size, (args.rows, width))
            positions = (torch.arange(width) % args.segment).expand(args.rows, -1).contiguous()

            def step(forward=forward, ids=ids, positions=positions) -> None:
                hidden = forward(input_ids=ids, position_ids=positions, use_cache=False)
                hidden.last_hidden_state[:, :: args.segment].pow(2).mean().backward()

            first, median = timed(step, args.repeats)
            print(
                f"{mode}{' dynamic' if args.dynamic and mode == 'compile' else ''} width {width}: "
                f"first pass {first:.1f} s, then median {median:.3f} s",
                flush=True,
            )


def matmul(args: argparse.Namespace) -> None:
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    flops = 2 * args.size**3
    torch.matmul(a, b)
    for calls in (int(c) for c in args.calls.split(",")):
        rates = []
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(calls):
                torch.matmul(a, b)
            rates.append(flops * calls / (time.perf_counter() - start) / 1e9)
        print(
            f"{calls} matmul(s) per window: median {statistics.median(rates):.0f} GFLOP/s, "
            f"range {min(rates):.0f}-{max(rates):.0f} ({' '.join(f'{r:.0f}' for r in rates)})",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="lever", required=True)
    a = sub.add_parser("attention")
    a.add_argument("--rows", type=int, default=15)
    a.add_argument("--widths", default="128,240,480")
    c = sub.add_parser("compile")
    c.add_argument("--rows", type=int, default=5)
    c.add_argument("--widths", default="240", help="packed row widths, timed in this order")
    c.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    m = sub.add_parser("matmul")
    m.add_argument("--size", type=int, default=2048)
    m.add_argument("--calls", default="1,5,20", help="matmuls per timed window")
    m.add_argument("--windows", type=int, default=12)
    for s in (a, c):
        s.add_argument("--segment", type=int, default=60, help="tokens per packed question")
        s.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    {"attention": attention, "compile": compile_, "matmul": matmul}[args.lever](args)


if __name__ == "__main__":
    main()

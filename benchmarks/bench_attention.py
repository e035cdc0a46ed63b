"""Training attention alone: the CPU kernel (`andromeda.train.attention_kernel`) against SDPA.

One layer's causal attention, forward and backward, bf16, at `bench_train.py`'s shape (batch 4,
8 query heads of 64, 2 key/value heads, 1024 tokens, 4 heads with ALiBi): the kernel (ALiBi in
it) against ATen's CPU flash attention as the model calls it without the kernel (ALiBi as two
extra key channels, a head of 66: `model.attention._alibi_as_channels`) and, for reference, plain
causal SDPA at 64 channels with no ALiBi at all. Rounds alternate the three; each prints the best
of `--repeats` calls and the real causal work done per second (4 B H T^2 D / 2 FLOPs forward,
2.5x that backward).

Then attention's prologue, the heads attention reads from the fused projection's output (QK-norm,
its learned scales, rotary xPos on the first half of each head): the kernel
(`attention_kernel.attention_prologue`) against the model's PyTorch ops under CPU autocast, as a
training step runs them without it (`model.attention.l2_normalize`, the scales, `apply_rotary`).

    python benchmarks/bench_attention.py                 # one thread, the bench_train shape
    python benchmarks/bench_attention.py --threads 2 --seq-len 4096 --batch 1
    python benchmarks/bench_attention.py --heads 24 --alibi-heads 12 --dim-head 128   # the 2.5 B default's heads
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import common
from andromeda.model.attention import NORM_EPS, _append_alibi_channels, l2_normalize
from andromeda.model.positions import apply_rotary, xpos_tables
from andromeda.train import attention_kernel as kernel_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--alibi-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernel_module.attention_kernel() is None:
        raise SystemExit(f"the attention kernel does not run here: {kernel_module.unavailable_reason()}")
    B, H, K, T, D = args.batch, args.heads, args.kv_heads, args.seq_len, args.dim_head
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=generator).bfloat16().requires_grad_() for n in (H, K, K))
    grad = torch.randn(B, H, T, D, generator=generator).bfloat16()
    positions = torch.arange(T)[None]
    slopes = torch.zeros(H)
    slopes[: args.alibi_heads] = 2.0 ** -torch.arange(1, args.alibi_heads + 1, dtype=torch.float32)
    scale = D**-0.5

    def kernel():
        return kernel_module.causal_attention(q, k, v, positions, slopes, scale)

    amx = kernel_module.amx_tiles() and D % kernel_module.AMX_HEAD_MULTIPLE == 0

    def sdpa_alibi():  # the model's path without the kernel
        qa, ka, va = _append_alibi_channels(q, k, v, slopes, positions, T // 2, scale, parts=2)
        out = F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=1.0, enable_gqa=True)
        return out[..., :D]

    def sdpa_plain():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    work = 4 * B * H * T * T * D / 2
    print("## Training attention, one layer (`benchmarks/bench_attention.py`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- batch {B}, {H} query / {K} key-value heads of {D}, {T} tokens, {args.alibi_heads} ALiBi heads, bf16; "
          f"best of {args.repeats} calls per round\n")
    print("| round | path | forward ms | GFLOP/s | backward ms | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        label = "kernel, AMX tiles" if amx else "kernel"
        grouped = kernel_module.tasks_per_kv_head(B, K)
        paths = [(label + ("" if grouped else " (a task per query head at this size)"), kernel, {})]
        if grouped:  # the backward's other task split: per-query-head float32 partials, summed at the end
            paths.append((label + ", a task per query head (float32 partials)", kernel, {"tasks_per_kv_head": lambda B, K: False}))
        if amx:  # the AVX-512 BF16 products the kernel takes on CPUs without AMX tiles, forward and backward
            paths.append(("kernel, vdpbf16ps (no AMX)", kernel, {"amx_tiles": lambda: False}))
        paths += [("SDPA + 2 ALiBi channels (the model without the kernel)", sdpa_alibi, {}),
                  ("SDPA, no ALiBi", sdpa_plain, {})]
        for name, function, replaced in paths:
            saved = {attribute: getattr(kernel_module, attribute) for attribute in replaced}
            for attribute, value in replaced.items():
                setattr(kernel_module, attribute, value)
            try:
                forward, backward = common.time_forward_backward(function, grad, args.repeats)
            finally:
                for attribute, value in saved.items():
                    setattr(kernel_module, attribute, value)
            print(f"| {round_} | {name} | {forward * 1e3:.1f} | {work / forward / 1e9:.0f} | {backward * 1e3:.1f} | "
                  f"{2.5 * work / backward / 1e9:.0f} |")
    prologue(args)


def prologue(args: argparse.Namespace) -> None:
    """The prologue kernel against the model's ops: best forward and backward of each, per round."""
    B, H, K, T, D = args.batch, args.heads, args.kv_heads, args.seq_len, args.dim_head
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, H + 2 * K, D, generator=generator).bfloat16().requires_grad_()
    q_scale = (torch.rand(H, 1, D, generator=generator) + D**0.25).requires_grad_()
    k_scale = (torch.rand(K, 1, D, generator=generator) + D**0.25).requires_grad_()
    rotary = xpos_tables(torch.arange(T)[None], D // 2, 10000.0, 512.0, T // 2)
    grads = [torch.randn(B, n, T, D, generator=generator).bfloat16() for n in (H, K, K)]

    def kernel():
        return kernel_module.attention_prologue(qkv, q_scale, k_scale, rotary, NORM_EPS)

    def model_ops():  # Attention.forward without the kernel, and the cast the fused attention takes
        q, k, v = qkv.transpose(1, 2).split((H, K, K), dim=1)
        q, k = l2_normalize(q) * q_scale, l2_normalize(k) * k_scale
        (q_cos, q_sin), (k_cos, k_sin) = rotary
        q, k = apply_rotary(q, q_cos, q_sin), apply_rotary(k, k_cos, k_sin)
        return [x.to(torch.bfloat16) for x in (q, k, v)]

    print(f"\nAttention's prologue (QK-norm, its scales, rotary xPos on {D // 2} channels), one layer, autocast bf16:\n")
    print("| round | path | forward ms | backward ms | forward + backward |")
    print("|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        for name, function in (("kernel (`attention_prologue`)", kernel), ("the model's PyTorch ops", model_ops)):
            forward, backward = common.time_forward_backward(function, grads, args.repeats, torch.bfloat16)
            print(f"| {round_} | {name} | {forward * 1e3:.1f} | {backward * 1e3:.1f} | {(forward + backward) * 1e3:.1f} |")


if __name__ == "__main__":
    main()

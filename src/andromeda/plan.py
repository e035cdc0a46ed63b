"""Capacity planning without allocating: parameters, FLOPs and per-GPU memory of a training run.

`plan(config, gpus, seq_len, batch)` builds the model on the meta device (shapes, no storage) to
count parameters exactly, then prices one training step under this setup:

* FSDP2 full sharding: `fully_shard` on every Block, then on the root, which holds the token
  embedding, the final norm and the output projection. `MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)` over fp32 parameters, so each GPU keeps its shard of the fp32 parameters, of
  the fp32 gradients and of AdamW's two fp32 moments: 4 + 4 + 8 = 16 bytes per parameter, divided
  over the GPUs (ZeRO-3, Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054). On top come
  transient unsharded copies: the root stays gathered from forward into backward, one Block computes
  while the next is prefetched, and one unit's full gradient exists while it is reduce-scattered.
* FLOPs per token in the PaLM convention (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311,
  appendix B): 6N + 12·L·H·D·T for training, where N counts the parameters that take part in a
  matrix product (all but the embedding lookup tables; the untied output projection is in N) and
  the attention term counts q·kᵀ and softmax·v over all T keys, with no discount for the causal
  mask. Chinchilla's appendix F (Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556) counts
  the same products (backward = 2 × forward). Because the causal kernel skips the masked half, the
  hardware does about 6·L·H·D·T less attention work than this counts; MFU figures in the literature
  (PaLM, Megatron, torchtitan) use the uncut term, so ours stay comparable.
* Activations: the tensors autograd saves for backward, counted tensor by tensor for this
  architecture's forward (`block_activation_bytes`), in the manner of Korthikanti et al. 2022
  (https://arxiv.org/abs/2205.05198) but with no dropout and with a fused attention kernel that keeps
  only a logsumexp per row (FlashAttention, Dao et al. 2022, https://arxiv.org/abs/2205.14135), so
  there is no term quadratic in T. With activation checkpointing each Block keeps only its input
  and one Block's activations exist at a time, during its recomputation.

All memory figures are per GPU, in bytes, and are estimates: they leave out the CUDA context,
NCCL buffers, allocator fragmentation and autograd's short-lived gradient buffers, which is why a
plan "fits" only within `USABLE_FRACTION` of the card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .choices import GIB, H100_BF16_TFLOPS, H100_GIB
from .model import build_transformer
from .model.attention import alibi_channels
from .config import Config
from .model.loss import LOSS_CHUNK

# Bytes per element of the compute (FSDP param_dtype) and activation dtype.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
MASTER_BYTES = 4  # fp32 sharded parameters
GRAD_BYTES = 4  # fp32 sharded gradients (reduce_dtype=fp32)
ADAM_BYTES = 8  # AdamW exp_avg and exp_avg_sq, fp32
STAT_BYTES = 4  # LayerNorm mean/rstd and the attention logsumexp are fp32 on CUDA
USABLE_FRACTION = 0.9  # of the card, leaving room for what the estimate leaves out
ASSUMED_MFU = 0.4  # the model FLOP utilisation throughput estimates assume (well-tuned large runs)


@dataclass(frozen=True)
class Plan:
    """What one training step of `config` costs; memory in bytes per GPU."""

    config: Config
    gpus: int
    seq_len: int
    batch: int  # sequences per GPU per micro-step
    dtype: str
    params: int
    embedding_params: int  # token (and position) lookup tables: no matrix product per token
    train_flops_per_token: int  # forward + backward, PaLM convention
    forward_flops_per_token: int  # one token attending to a context of seq_len
    sharded_params_bytes: int  # fp32 parameter shard
    sharded_grads_bytes: int  # fp32 gradient shard
    optimizer_bytes: int  # AdamW moments, sharded
    gathered_bytes: int  # transient unsharded params and one unit's unsharded gradient
    activation_bytes: int  # without activation checkpointing, fused-loss buffers included
    checkpointed_activation_bytes: int  # with activation checkpointing, fused-loss buffers included
    loss_bytes: int  # of which the fused loss's buffers
    activation_checkpointing: bool  # the setting `total_bytes` assumes
    gpu_memory_bytes: int
    recommendation: str

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * USABLE_FRACTION)

    @property
    def total_bytes(self) -> int:
        return self.total_bytes_with(self.activation_checkpointing)

    def total_bytes_with(self, activation_checkpointing: bool) -> int:
        if activation_checkpointing:
            return self.state_bytes + self.checkpointed_activation_bytes
        return self.state_bytes + self.activation_bytes

    @property
    def state_bytes(self) -> int:
        """Everything but activations: parameter, gradient and optimizer shards, gathered units."""
        shards = self.sharded_params_bytes + self.sharded_grads_bytes + self.optimizer_bytes
        return shards + self.gathered_bytes

    def tokens_per_second(self, peak_tflops: float = H100_BF16_TFLOPS, mfu: float = ASSUMED_MFU) -> float:
        """Training tokens per second per GPU if it sustains `mfu` of `peak_tflops`."""
        check_throughput_inputs(peak_tflops, mfu)
        return peak_tflops * 1e12 * mfu / self.train_flops_per_token


def plan(
    config: Config | str,
    gpus: int = 1,
    seq_len: int | None = None,
    batch: int = 1,
    dtype: str = "bf16",
    activation_checkpointing: bool | None = None,
    *,
    gpu_memory_gib: float = H100_GIB,
) -> Plan:
    """Price a training run of `config` on `gpus` GPUs with `batch` sequences of `seq_len` tokens
    per GPU per micro-step, computing in `dtype`. Nothing is allocated.

    `config` may be a preset name. `activation_checkpointing=None` picks it only when the run does
    not fit without it.
    """
    if isinstance(config, str):
        config = Config.from_preset(config)
    if not isinstance(config, Config):
        raise TypeError(f"config must be an andromeda.Config or a preset name, got "
                        f"{type(config).__name__}; e.g. Config.from_preset('7b') or '7b'")
    seq_len = config.max_seq_len if seq_len is None else seq_len
    _check_inputs(config, gpus, seq_len, batch, dtype, activation_checkpointing, gpu_memory_gib)
    width = DTYPE_BYTES[dtype]
    net = build_transformer(config, device="meta")  # shapes only: no storage behind any parameter
    params = net.num_parameters()
    tables = [net.token_emb] + ([net.pos_emb] if net.pos_emb is not None else [])
    embedding_params = sum(p.numel() for m in tables for p in m.parameters())

    C, L = config.dim, config.depth
    matmul_params = params - embedding_params
    train_flops, forward_flops = flops_per_token(config, seq_len, matmul_params)

    sharded = _sharded_numel(net, gpus)
    block = sum(p.numel() for p in net.blocks[0].parameters())
    root = params - L * block
    # Unsharded under FSDP (parallel.parallelize): the root in fp32, which stays gathered from
    # forward into backward, and two Blocks in the compute dtype (one computing, the next
    # prefetched); plus the largest unit's unsharded gradient and the fp32 copy reduce-scatter sums.
    grad_copy = width + (GRAD_BYTES if width != GRAD_BYTES else 0)
    fsdp_gathered = root * MASTER_BYTES + 2 * block * width + max(root * GRAD_BYTES, block * grad_copy)
    # One process under autocast instead: each weight's bf16 copy, cast once per step, is cached
    # by autocast and kept for backward, so all of them exist together (fp32: no copies).
    gathered = (matmul_params * width if width != MASTER_BYTES else 0) if gpus == 1 else fsdp_gathered

    tokens = batch * seq_len
    one_block = block_activation_bytes(config, batch, seq_len, width)
    head = tokens * (C * width + 2 * STAT_BYTES)  # the final norm's input and statistics
    loss = loss_bytes(config, tokens, width)
    full = L * one_block + head + loss
    # Checkpointed, each Block keeps only its input (B, T, C); one Block's activations exist at a
    # time, while backward recomputes it.
    checkpointed = L * tokens * C * width + one_block + head + loss

    memory = int(gpu_memory_gib * GIB)
    usable = int(memory * USABLE_FRACTION)
    state = sharded * (MASTER_BYTES + GRAD_BYTES + ADAM_BYTES) + gathered
    if activation_checkpointing is None:
        activation_checkpointing = state + full > usable
    recommendation = _recommend(net, state, full, checkpointed, fsdp_gathered, usable, gpu_memory_gib)
    return Plan(
        config=config, gpus=gpus, seq_len=seq_len, batch=batch, dtype=dtype, params=params,
        embedding_params=embedding_params, train_flops_per_token=train_flops,
        forward_flops_per_token=forward_flops, sharded_params_bytes=sharded * MASTER_BYTES,
        sharded_grads_bytes=sharded * GRAD_BYTES, optimizer_bytes=sharded * ADAM_BYTES,
        gathered_bytes=gathered, activation_bytes=full, checkpointed_activation_bytes=checkpointed,
        loss_bytes=loss, activation_checkpointing=activation_checkpointing,
        gpu_memory_bytes=memory, recommendation=recommendation,
    )


def flops_per_token(config: Config, seq_len: int, matmul_params: int | None = None) -> tuple[int, int]:
    """(training, forward) FLOPs per token at context `seq_len`, in the PaLM convention (module
    docstring): 6N + 12·L·H·D·T and 2N + 4·L·H·D·T, attention over all T keys, the causal mask
    not discounted. N counts the weights of every matrix product (`matmul_params`, computed from
    the config when not given). MFU figures everywhere in this project use it."""
    if matmul_params is None:
        net = build_transformer(config, device="meta")
        tables = [net.token_emb] + ([net.pos_emb] if net.pos_emb is not None else [])
        matmul_params = net.num_parameters() - sum(p.numel() for m in tables for p in m.parameters())
    attention = 4 * config.depth * config.heads * config.dim_head * seq_len  # q·kᵀ and softmax·v
    return 6 * matmul_params + 3 * attention, 2 * matmul_params + attention


def block_activation_bytes(
    config: Config, batch: int, seq_len: int, width: int, device_type: str = "cuda"
) -> int:
    """Bytes one Block saves for backward on `batch` sequences of `seq_len` tokens, activations
    `width` bytes per element, on a `device_type` device. Each term names the tensor and the op that keeps it alive
    (model.Block, attention.Attention); a view shares its base's storage and is not counted again.

    Shape letters: C width, H query heads, K key/value heads, D head size, F feed-forward width.
    """
    C, H, K, D, F = config.dim, config.heads, config.attn_kv_heads, config.dim_head, config.ff_dim
    alibi_as_channels = config.attn_flash and config.num_alibi_heads > 0  # attention._alibi_as_channels
    transformed = config.rotary_xpos or config.use_qk_norm  # then q, k are new (B, H, T, D) tensors
    elements = 2 * C  # attn_norm's input; to_qkv's input (the normed x)
    stats = 2 * 2  # fp32: mean and rstd of the two LayerNorms
    if config.use_qk_norm or not alibi_as_channels:
        elements += (H + 2 * K) * D  # the fused qkv output, kept by QK-norm or by attention's v view
    if config.use_qk_norm:
        elements += 2 * (H + K)  # F.normalize keeps each head's norm and its clamped copy
        if config.attn_qk_norm_dim_scale:
            elements += (H + K) * D  # the normalized q, k, kept by the multiply with the scales
    probabilities = 0
    if alibi_as_channels:
        # The ALiBi channels (padded on CUDA) are appended to q, k and v; the kernel
        # keeps those copies, its padded output and a logsumexp per head. Slicing the padding off
        # the output leaves heads that no view can merge, so to_out's input is one more copy.
        padded = D + alibi_channels(D, device_type)
        elements += (H + 2 * K) * padded + H * padded + H * D
        stats += H
    elif config.attn_flash:
        # The kernel keeps q, k (v is a view of qkv), its output and a logsumexp per head. Its
        # output has q's memory layout, so merging heads for to_out copies only when q was (B, H,
        # T, D) in memory, not a view of qkv's (B, T, H + 2K, D).
        elements += (H + K) * D * transformed + H * D + H * D * transformed
        stats += H
    else:
        # The reference path keeps q, k, each row's softmax over all keys in fp32 and its cast,
        # and to_out's input, copied out of the (B, H, T, D) product.
        elements += (H + K) * D * transformed + H * D
        probabilities = H * seq_len * (4 + width)
    elements += 2 * C + F  # ff_norm's and proj_in's inputs; GELU's input (fused.feed_forward)
    per_token = elements * width + stats * STAT_BYTES + probabilities
    # Each rotary call scales cos and sin by xPos, for queries and for keys: 4 tables (T, R/2), fp32.
    rotary = 4 * seq_len * (config.rotary_dim // 2) * 4 if config.rotary_xpos else 0
    return batch * seq_len * per_token + rotary


def loss_bytes(config: Config, tokens: int, width: int) -> int:
    """Peak bytes of the fused linear cross-entropy (wrapper.linear_cross_entropy) on `tokens` rows.

    It forms the gradients during the forward pass, so it holds d loss/d hidden (tokens, C) and
    d loss/d weight (V, C) in fp32 until backward. Per chunk of LOSS_CHUNK rows it peaks at either
    the fp32 logits, the fp32 softmax, its masked fp32 copy and their cast, or at the fp32 logits
    and the cast gradient while `grad.T @ h` makes a (V, C) product and its fp32 copy.
    """
    V, C = config.num_tokens, config.dim
    rows = min(tokens, LOSS_CHUNK)
    persistent = tokens * C * width + V * C * 4
    chunk = max(rows * V * (3 * 4 + width), rows * V * (4 + width) + V * C * (width + 4))
    return persistent + chunk


def format_plan(plan: Plan, peak_tflops: float = H100_BF16_TFLOPS, mfu: float = ASSUMED_MFU) -> str:
    """A readable table of `plan`: parameters, FLOPs per token, per-GPU memory with and without
    activation checkpointing, a throughput estimate at `mfu` of `peak_tflops`, the recommendation."""
    check_throughput_inputs(peak_tflops, mfu)
    c, p = plan.config, plan
    attention = p.train_flops_per_token - 6 * p.non_embedding_params
    tokens = p.batch * p.seq_len
    rows = [
        ("parameters (fp32 shard, 4N/g)", p.sharded_params_bytes, p.sharded_params_bytes),
        ("gradients (fp32 shard, 4N/g)", p.sharded_grads_bytes, p.sharded_grads_bytes),
        ("AdamW moments (fp32 shard, 8N/g)", p.optimizer_bytes, p.optimizer_bytes),
        (f"{p.dtype} weight copies (autocast)" if p.gpus == 1 else "gathered units (transient)",
         p.gathered_bytes, p.gathered_bytes),
        ("activations", p.activation_bytes, p.checkpointed_activation_bytes),
        ("  of which fused-loss buffers", p.loss_bytes, p.loss_bytes),
        ("total", p.total_bytes_with(False), p.total_bytes_with(True)),
    ]
    lines = [
        f"model      dim {c.dim}, depth {c.depth}, {c.heads} heads of {c.dim_head} "
        f"({c.attn_kv_heads} kv), vocab {c.num_tokens}",
        f"parameters {_count(p.params)} total: {_count(p.embedding_params)} embedding, "
        f"{_count(p.non_embedding_params)} non-embedding (blocks, final norm, output projection)",
        f"run        {p.gpus} GPU{'s' if p.gpus > 1 else ''} x batch {p.batch} x seq {p.seq_len} "
        f"= {tokens * p.gpus:,} tokens per micro-step; "
        + (f"one process, {p.dtype} autocast over fp32 weights, gradients and AdamW" if p.gpus == 1 else
           f"FSDP2 full sharding, {p.dtype} compute, fp32 master weights and gradient reduction"),
        f"FLOPs      training {_flops(p.train_flops_per_token)}/token "
        f"(6N {_flops(6 * p.non_embedding_params)} + attention {_flops(attention)}, PaLM "
        f"convention, causal mask not discounted); inference forward "
        f"{_flops(p.forward_flops_per_token)}/token at context {p.seq_len}",
        "",
        f"{'memory per GPU (GiB)':<36}{'no checkpointing':>18}{'checkpointing':>15}",
    ]
    lines += [f"{name:<36}{_gib(a):>18}{_gib(b):>15}" for name, a, b in rows]
    lines += [
        f"{'usable of ' + _gib(p.gpu_memory_bytes) + ' GiB card':<36}{_gib(p.usable_bytes):>18}"
        f"{_gib(p.usable_bytes):>15}",
        "",
        f"throughput estimate: ~{p.tokens_per_second(peak_tflops, mfu):,.0f} tokens/s per GPU at "
        f"{mfu:.0%} MFU of {peak_tflops:g} TFLOP/s "
        f"(~{tokens / p.tokens_per_second(peak_tflops, mfu):.2f} s per micro-step; an estimate, "
        f"not a measurement)",
        f"recommendation: {p.recommendation}",
    ]
    return "\n".join(lines)


def _check_inputs(
    config: Config, gpus: int, seq_len: int, batch: int, dtype: str,
    activation_checkpointing: bool | None, gpu_memory_gib: float,
) -> None:
    for name, value in (("gpus", gpus), ("seq_len", seq_len), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if batch < 1:
        raise ValueError(f"batch (sequences per GPU per micro-step) must be >= 1, got {batch}")
    if not 1 <= seq_len <= config.max_seq_len:
        raise ValueError(f"seq_len must be in 1..max_seq_len ({config.max_seq_len}), got {seq_len}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if activation_checkpointing is not None and not isinstance(activation_checkpointing, bool):
        raise TypeError(f"activation_checkpointing must be True, False or None (decide), got "
                        f"{activation_checkpointing!r}")
    if not (_positive_finite(gpu_memory_gib) and math.isfinite(gpu_memory_gib * GIB)):
        raise ValueError(f"gpu_memory_gib must be a positive, finite number of GiB (e.g. 80), got {gpu_memory_gib!r}")


def check_throughput_inputs(peak_tflops: float, mfu: float) -> None:
    """Raise a ValueError naming the input unless `peak_tflops` is a positive, finite number and
    `mfu` a fraction in (0, 1]: NaN, infinity or zero would print a meaningless estimate."""
    if not (_positive_finite(mfu) and mfu <= 1):
        raise ValueError(f"mfu must be a fraction in (0, 1] (e.g. 0.4), got {mfu!r}")
    if not (_positive_finite(peak_tflops) and math.isfinite(peak_tflops * 1e12)):
        raise ValueError(f"peak_tflops must be a positive, finite number of TFLOP/s (e.g. 989), got {peak_tflops!r}")


def _positive_finite(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _sharded_numel(net: nn.Module, gpus: int) -> int:
    """Elements one GPU holds: FSDP2 splits each parameter on dim 0 into `gpus` chunks, padded to
    equal size, so every rank is charged ceil(rows / gpus) rows of every parameter."""
    return sum(math.ceil(p.shape[0] / gpus) * (p.numel() // p.shape[0]) for p in net.parameters())


def _recommend(
    net: nn.Module, state: int, full: int, checkpointed: int, gathered: int, usable: int,
    gpu_memory_gib: float,
) -> str:
    """Whether the run fits with or without activation checkpointing, and if neither, how many
    GPUs would make it fit."""
    card = f"{gpu_memory_gib:g} GiB of GPU memory ({_gib(usable)} GiB usable)"
    numbers = f"{_gib(state + full)} GiB without checkpointing, {_gib(state + checkpointed)} GiB with"
    if state + full <= usable:
        return f"fits in {card} without activation checkpointing ({numbers}); leave it off"
    if state + checkpointed <= usable:
        return f"turn activation checkpointing on: only then it fits in {card} ({numbers})"
    needed = _min_gpus(net, usable - gathered - checkpointed)
    if needed is None:
        return (f"does not fit in {card} ({numbers}), and the {_gib(gathered + checkpointed)} GiB "
                f"of activations and gathered units do not shard, so no GPU count helps: lower "
                f"batch or seq_len")
    return (f"does not fit in {card} ({numbers}): use at least {needed} GPUs with activation "
            f"checkpointing, or lower batch or seq_len")


def _min_gpus(net: nn.Module, room: int) -> int | None:
    """The fewest GPUs whose parameter, gradient and optimizer shards fit in `room` bytes (what
    is left of a GPU after everything that does not shrink with more GPUs); None if none does."""
    per_element = MASTER_BYTES + GRAD_BYTES + ADAM_BYTES
    one_row_each = sum(p.numel() // p.shape[0] for p in net.parameters())  # the most GPUs can do
    if room < one_row_each * per_element:
        return None
    gpus = max(1, math.ceil(_sharded_numel(net, 1) * per_element / room))
    while _sharded_numel(net, gpus) * per_element > room:  # padding of the shards: rarely loops
        gpus += 1
    return gpus


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e6:.2f} MFLOP"


# --------------------------------------------------------------------------- LoRA and QLoRA

LORA_ADAPTER_BYTES = MASTER_BYTES + GRAD_BYTES + ADAM_BYTES  # fp32 adapter, its gradient, AdamW moments
QUANTIZED_WEIGHT_BYTES = {"int8": 1.0, "int4": 0.5}
# The training process itself before any model: Python, PyTorch, peft and the command's imports
# (benchmarks/bench_lora.py measured 0.47 GB of peak RSS for an idle one). A one-machine LoRA run
# is judged by its whole RSS, so its plan counts this too.
PROCESS_BYTES = 500_000_000


@dataclass(frozen=True)
class LoraPlan:
    """What one step of a LoRA (or QLoRA) fine-tune of `full.config` costs in one process (DDP
    replicas each hold the same); memory in bytes. `full` is the full fine-tune's plan, whose
    FLOPs and activations it starts from."""

    full: Plan
    rank: int
    targets: tuple[str, ...]
    quantize: str | None
    adapter_params: int
    frozen_bytes: int  # the base: Linears in the compute dtype (or int8/int4 with scales), the rest as loaded
    adapter_bytes: int  # adapters, their gradients and AdamW moments, fp32
    activation_bytes: int
    checkpointed_activation_bytes: int
    transient_bytes: int  # QLoRA: one layer's weight dequantized to fp32 in backward
    process_bytes: int = PROCESS_BYTES  # Python, PyTorch and the imports, before any model

    def total_bytes_with(self, activation_checkpointing: bool) -> int:
        activations = self.checkpointed_activation_bytes if activation_checkpointing else self.activation_bytes
        return self.frozen_bytes + self.adapter_bytes + self.transient_bytes + activations + self.process_bytes


def lora_layer_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """--lora-targets name -> (in_features, out_features) of that Linear in each block."""
    C, H, K, D, F = config.dim, config.heads, config.attn_kv_heads, config.dim_head, config.ff_dim
    return {"qkv": (C, (H + 2 * K) * D), "out": (H * D, C), "ff_in": (C, F), "ff_out": (F, C)}


def lora_plan(
    config: Config | str, rank: int, targets: tuple[str, ...] = ("qkv", "out", "ff_in", "ff_out"),
    quantize: str | None = None, seq_len: int | None = None, batch: int = 1, dtype: str = "bf16",
    dropout: bool = False, *, gpu_memory_gib: float = H100_GIB,
) -> LoraPlan:
    """Price a LoRA fine-tune as `train --lora-rank` runs it (`train.lora`): the base frozen with
    its Linears in `dtype` (or int8 / int4 with `quantize`), embeddings and norms fp32 (in `dtype`
    under QLoRA, which loads the whole base so); rank-`rank` adapters on `targets` in every block
    with fp32 AdamW; `batch` sequences of `seq_len` tokens. Nothing is allocated.

    Activations are the full fine-tune's (the adapters need their layers' inputs, the same tensors
    the weight gradients need), plus what the adapters add: the feed-forward's GELU output (the
    fused feed-forward, which recomputes it, runs only over plain Linears), each adapter's (N, r)
    intermediate, and with `dropout` each dropped input and its mask; less the fused loss's (V, C)
    gradient, which a frozen output projection does not form."""
    full = plan(config, 1, seq_len, batch, dtype, False, gpu_memory_gib=gpu_memory_gib)
    config = full.config
    shapes = lora_layer_shapes(config)
    unknown = sorted(set(targets) - set(shapes))
    if unknown or not targets:
        raise ValueError(f"targets must name layers among {', '.join(shapes)}, got {list(targets)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if quantize is not None and quantize not in QUANTIZED_WEIGHT_BYTES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZED_WEIGHT_BYTES)} or None, got {quantize!r}")
    width, L, V, C = DTYPE_BYTES[dtype], config.depth, config.num_tokens, config.dim
    adapter_params = L * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    linears = [(i, o) for i, o in shapes.values()] * L + [(C, V)]  # every block's, and the output projection
    linear_params = sum(i * o for i, o in linears)
    biases = L * (config.ff_dim + C)  # the feed-forward's (the other Linears have none)
    other_params = full.params - linear_params - biases  # embeddings, norms, QK-norm scales
    if quantize is None:
        frozen = (linear_params + biases) * width + other_params * MASTER_BYTES
        transient = 0
    else:
        # A scale per output row (int8), or a scale and a zero per group of 128 inputs (int4).
        scales = sum(o * (1 if quantize == "int8" else 2 * math.ceil(i / 128)) for i, o in linears)
        frozen = int(linear_params * QUANTIZED_WEIGHT_BYTES[quantize]) + (scales + biases + other_params) * width
        transient = max(i * o for i, o in linears) * MASTER_BYTES
    tokens = full.batch * full.seq_len
    per_token = rank * len(targets) * width + (config.ff_dim * width if {"ff_in", "ff_out"} & set(targets) else 0)
    if dropout:
        per_token += sum(shapes[t][0] * (width + 1) for t in targets)
    extra = L * tokens * per_token - V * C * 4  # the loss keeps no (V, C) fp32 weight gradient
    checkpointed_extra = tokens * per_token - V * C * 4  # one block's, while it is recomputed
    return LoraPlan(
        full=full, rank=rank, targets=tuple(targets), quantize=quantize, adapter_params=adapter_params,
        frozen_bytes=frozen, adapter_bytes=adapter_params * LORA_ADAPTER_BYTES,
        activation_bytes=full.activation_bytes + extra,
        checkpointed_activation_bytes=full.checkpointed_activation_bytes + checkpointed_extra,
        transient_bytes=transient,
    )


def format_lora_plan(p: LoraPlan) -> str:
    """A readable table of a LoRA plan: what trains, and the memory with and without activation
    checkpointing."""
    f = p.full
    base = f"{p.quantize} Linears, QLoRA" if p.quantize else f"{f.dtype} Linears, fp32 embeddings and norms"
    rows = [
        (f"frozen base ({base})", p.frozen_bytes, p.frozen_bytes),
        ("adapters, gradients, AdamW (fp32, 16 B each)", p.adapter_bytes, p.adapter_bytes),
        ("activations", p.activation_bytes, p.checkpointed_activation_bytes),
    ]
    if p.transient_bytes:
        rows.append(("one dequantized weight (backward)", p.transient_bytes, p.transient_bytes))
    rows.append(("the process (Python, PyTorch, peft; measured)", p.process_bytes, p.process_bytes))
    rows.append(("total", p.total_bytes_with(False), p.total_bytes_with(True)))
    lines = [
        f"LoRA       rank {p.rank} on {', '.join(p.targets)} of {f.config.depth} blocks: "
        f"{_count(p.adapter_params)} trainable of {_count(f.params)} ({100 * p.adapter_params / f.params:.2f}%)",
        f"run        one process, batch {f.batch} x seq {f.seq_len}, {f.dtype} compute",
        "",
        f"{'memory (GiB)':<56}{'no checkpointing':>18}{'checkpointing':>15}",
    ]
    lines += [f"{name:<56}{_gib(a):>18}{_gib(b):>15}" for name, a, b in rows]
    lines.append("an estimate from tensor shapes and the measured process: allocator overheads and a "
                 "CUDA context come on top")
    return "\n".join(lines)

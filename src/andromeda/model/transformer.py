"""The decoder-only Transformer: token embedding, pre-norm blocks, final norm, logits or loss.

Shape letters: B batch, T positions, C model width, V vocabulary.

Reads top-down: LayerNorm, FeedForward, Block, then Transformer, then its construction (`build_transformer`)
and the token checks. Attention and positions live in attention.py and positions.py, the KV
cache in cache.py, the loss in loss.py. Sampling and the cache's lifecycle belong to
`andromeda.inference`; nothing here knows about training, checkpoints or processes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import Config
from .attention import (Attention, AttentionInputs, AttentionPrologue, CausalAttention, XposBlocks, query_head_order,
                        xpos_block_rows)
from .cache import CacheStep, KVCache
from .fused import Transposer, Workspace, feed_forward
from .loss import SoftmaxCrossEntropy, projected_cross_entropy
from .positions import alibi_slopes, xpos_blocks, xpos_max_factor, xpos_reach, xpos_tables

logger = logging.getLogger(__name__)

INIT_STD = 0.02  # GPT-2's initialisation of weights and embeddings (Radford et al. 2019)


class NormToBF16(Protocol):
    """LayerNorm without bias of float32 rows (..., C) by a float32 weight (C,), rounded to bf16,
    for bf16 autocast on the CPU (the training loop's `train.norm_kernel`): what autocast's float32
    F.layer_norm and the bf16 conversion its consumers make compute together, in one pass each way."""

    def __call__(self, x: Tensor, weight: Tensor, eps: float) -> Tensor: ...


# Entries of a norm's input from which `LayerNorm.to_bf16` is used: under it the kernel's call
# costs more than the passes it saves (the `demo` preset's (2048, 192) norms: its training steps
# 3-6% slower with them, two threads).
NORM_TO_BF16_MIN = 1 << 20


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm without bias, whose owner may give it `to_bf16` (a `NormToBF16`): used for
    float32 input and weight of NORM_TO_BF16_MIN entries or more under bf16 CPU autocast, where
    every consumer of the norm takes bf16; it then returns bf16 where nn.LayerNorm returns float32.
    Not while torch.compile traces (Inductor fuses the norm and the conversions itself)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps=eps, bias=False)
        self.to_bf16: NormToBF16 | None = None

    def forward(self, x: Tensor) -> Tensor:
        if (self.to_bf16 is not None and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.numel() >= NORM_TO_BF16_MIN and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling()):
            return self.to_bf16(x, self.weight, self.eps)
        return super().forward(x)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, four times wider inside (Vaswani et al. 2017).

    Computed by `fused.feed_forward`: in training it keeps one (B, T, 4C) tensor for backward
    instead of two, with its scratch space in a `Workspace` all blocks of one forward share.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.proj_in = nn.Linear(config.dim, config.ff_dim)
        self.proj_out = nn.Linear(config.ff_dim, config.dim)

    def forward(self, x: Tensor, workspace: Workspace) -> Tensor:
        return feed_forward(x, self.proj_in, self.proj_out, workspace)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ff_norm = LayerNorm(config.dim, config.norm_eps)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor, inputs: AttentionInputs, workspace: Workspace) -> Tensor:
        x = x + self.attn(self.attn_norm(x), inputs)
        return x + self.ff(self.ff_norm(x), workspace)


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, V), or the loss against given targets."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.dim) if config.use_abs_pos_emb else None
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.depth))
        self.final_norm = LayerNorm(config.dim, config.norm_eps)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        # The loss's fused softmax over bf16 logits (`loss.SoftmaxCrossEntropy`), where its owner
        # gives one (the training loop, `train.loss_kernel`); None: PyTorch's ops.
        self.softmax_cross_entropy: SoftmaxCrossEntropy | None = None
        # Causal attention for bf16 on the CPU (`attention.CausalAttention`), where its owner gives
        # one (the training loop, `train.attention_kernel`); None: PyTorch's SDPA.
        self.causal_attention: CausalAttention | None = None
        # Its QK-norm and rotary xPos in one pass (`attention.AttentionPrologue`), given with it.
        self.attention_prologue: AttentionPrologue | None = None
        # Transposed copies for the weight gradients of bf16 training on the CPU (`fused.Transposer`),
        # where its owner gives one (the training loop, `train.transpose_kernel`); None: PyTorch's ops.
        self.transpose: Transposer | None = None
        slopes = alibi_slopes(config.num_alibi_heads, config.heads)
        order = query_head_order(config.heads, config.attn_kv_heads)
        # Plain attributes, not buffers: a meta-device build must not leave them uninitialised,
        # and casting the model to bf16 must not round them.
        self._slopes = [slopes[h] for h in order] if config.num_alibi_heads else None
        self._slopes_on: dict[torch.device, Tensor] = {}
        self._extrapolation_logged = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, INIT_STD), residual output projections scaled by
        1/sqrt(2 * depth).

        Each weight draws from its own generator seeded off the global one, so the init is
        reproducible under torch.manual_seed and can fill weights on all CPU threads at once
        (one thread's normal_ is slow for billions of weights).
        """
        residual_std = INIT_STD / math.sqrt(2 * self.config.depth)
        normal: list[tuple[Tensor, float]] = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("to_out", "proj_out")) else INIT_STD
                normal.append((module.weight, std))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal.append((module.weight, INIT_STD))
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Attention):
                module.reset_parameters()
        base_seed = int(torch.randint(0, 2**62, (), dtype=torch.long))

        def fill(index: int) -> None:
            weight, std = normal[index]
            generator = torch.Generator(device=weight.device).manual_seed(base_seed + index)
            with torch.no_grad():  # grad mode is per thread
                weight.normal_(0.0, std, generator=generator)

        if normal and normal[0][0].device.type == "cpu":
            with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
                list(pool.map(fill, range(len(normal))))
        else:
            for index in range(len(normal)):
                fill(index)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        cache: KVCache | CacheStep | None = None,
        slots: Sequence[int] | None = None,
        targets: Tensor | None = None,
        reduction: str = "mean",
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
        validate: bool = True,
    ) -> Tensor:
        """Logits (B, T, V) for token ids (B, T); or the loss against `targets`.

        positions: (B, T) absolute positions, increasing along each row; ALiBi and xPos read
            distances from them, learned absolute positions look them up. Default: 0..T-1, or
            with a cache each slot's next positions.
        key_mask: (B, T) True for real tokens; padding is never attended to (its own outputs
            are meaningless).
        cache: a `KVCache`; the new keys and values are appended to the rows' slots and the
            queries read everything those slots hold. slots: (B,) the slot of each row
            (default: row b is slot b). Or the `CacheStep` that `KVCache.append` returned for
            this call (slots and positions given there): the cache's host-side bookkeeping then
            stays outside a compiled forward (`inference.generate`'s compiled decode step).
        targets: (B, T) next-token ids (-100 ignored) -> the cross-entropy instead of logits,
            its `reduction` "mean" or "sum", computed without holding all (B, T, V) logits.
        logits_to_keep: project only the last n positions: logits (B, n, V).
        return_hidden: the final-normed hidden states (B, T, C) instead of logits (bf16 under bf16 CPU
            autocast where the norms were given a `NormToBF16`).
        validate: check token ids and shapes (False skips them, for ids the library produced).
        """
        if validate:
            check_tokens(tokens, self.config)
            _check_inputs(tokens, positions, key_mask, targets, self.config)
        if tokens.shape[1] > self.config.max_seq_len and not self._extrapolation_logged:
            if not torch.compiler.is_compiling():
                logger.info("extrapolating past max_seq_len=%d: %d positions", self.config.max_seq_len,
                            tokens.shape[1])
                self._extrapolation_logged = True
        if isinstance(cache, CacheStep):
            step = cache
            given = [name for name, value in (("slots", slots), ("positions", positions), ("key_mask", key_mask))
                     if value is not None]
            if given or step.new != tokens.shape[1]:
                raise ValueError(f"a CacheStep already holds the slots, positions and padding of its call, for "
                                 f"{step.new} tokens; got {', '.join(given) or 'no'} extra inputs and "
                                 f"{tokens.shape[1]} tokens")
        else:
            step = cache.append(slots, positions, key_mask, tokens.shape[1]) if cache is not None else None
        inputs = self._attention_inputs(tokens, positions, key_mask, step)
        x = self.token_emb(tokens)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(inputs.q_pos) * self.config.dim**-0.5
        workspace = Workspace(self.transpose)  # the blocks' shared scratch, freed with this forward's graph
        for block in self.blocks:
            x = block(x, inputs, workspace)
        x = self.final_norm(x)
        if targets is not None:
            return projected_cross_entropy(x.flatten(0, 1), self.to_logits, targets.flatten(), reduction,
                                           softmax=self.softmax_cross_entropy, transpose=self.transpose)
        if return_hidden:
            return x
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        return self.to_logits(x)

    def _attention_inputs(self, tokens: Tensor, positions: Tensor | None, key_mask: Tensor | None,
                          step: CacheStep | None) -> AttentionInputs:
        device, T = tokens.device, tokens.shape[1]
        config = self.config
        dtype = _activation_dtype(device, self.token_emb.weight.dtype)
        blocks = None
        if step is not None:
            q_pos, k_pos, center = step.q_pos, step.k_pos, step.center
            fresh = step.start == 0 and step.read == step.new
            k_valid = None if fresh and key_mask is None else step.k_valid
            reach = step.cache.reach
            if reach is not None and xpos_reach(config.xpos_scale_base, dtype) < reach:
                raise ValueError(f"a KV cache in {step.cache.dtype} keeps xPos centers further away than "
                                 f"{dtype} activations can take; create the cache in {dtype}")
        else:
            q_pos = torch.arange(T, device=device)[None] if positions is None else positions  # (B or 1, T)
            k_pos, k_valid = q_pos, key_mask
            # The center x-transformers uses (T // 2), from each row's first position, unless some
            # position is too far from it for xPos (positions.py): then a center per query block.
            center = T // 2 if positions is None else positions[:, :1] + T // 2
            if config.rotary_xpos:
                reach = xpos_reach(config.xpos_scale_base, dtype)
                if _distance_from_center(positions, T) > reach:
                    blocks = XposBlocks(xpos_blocks(q_pos, xpos_block_rows(T), reach), config.rotary_dim,
                                        config.xpos_scale_base, xpos_max_factor(dtype))
        rotary = None
        if config.rotary_xpos:  # the keys written are the new tokens: one pair of tables
            rotary = xpos_tables(q_pos, config.rotary_dim, config.rotary_base,
                                 None if blocks is not None else config.xpos_scale_base, center,
                                 max_factor=xpos_max_factor(dtype))
        window = step.window if step is not None else None
        return AttentionInputs(q_pos, k_pos, rotary, self._slopes_tensor(device), k_valid, step, blocks, window,
                               causal_attention=self.causal_attention, attention_prologue=self.attention_prologue,
                               transpose=self.transpose)

    def _slopes_tensor(self, device: torch.device) -> Tensor | None:
        if self._slopes is None:
            return None
        if torch.compiler.is_compiling():  # a dict filled in forward would force a recompile
            return torch.tensor(self._slopes, device=device)
        if device not in self._slopes_on:
            self._slopes_on[device] = torch.tensor(self._slopes, device=device)
        return self._slopes_on[device]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _activation_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype queries and keys are computed in: autocast's, or the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def _distance_from_center(positions: Tensor | None, T: int) -> int:
    """How far the positions of an uncached forward sit from the center first + T // 2 (at most;
    under torch.compile, given positions are trusted to be 0..T-1 apart, as reading them back
    would break the graph)."""
    if positions is None or torch.compiler.is_compiling():
        return T // 2
    span = int((positions[:, -1] - positions[:, 0]).max())
    return max(T // 2, span - T // 2)


def build_transformer(
    config: Config, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """Build on the meta device, then allocate once on the target and initialise in place.

    This skips nn.Linear's default init (a wasted pass over billions of weights), honours an
    enclosing `with torch.device("meta")` (nothing is allocated then), and with `dtype` builds
    directly in that dtype, with no transient fp32 copy.
    """
    target = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        net = Transformer(config)
    if dtype is not None:
        net = net.to(dtype)
    if target.type == "meta":
        return net
    net = net.to_empty(device=target)
    net.reset_parameters()
    return net


def check_tokens(tokens: Tensor, config: Config, max_len: int | None = None) -> None:
    """Raise a ValueError/TypeError naming the problem for anything but valid (B, T) token ids.

    `max_len` (default max_seq_len) limits T only for models with learned absolute positions
    (use_abs_pos_emb): ALiBi and xPos read any distance, so max_seq_len is the length such a
    model was built and trained for, and the forward pass extrapolates past it.
    """
    max_len = config.max_seq_len if max_len is None else max_len
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of integer ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(
            f"token ids must be integers (torch.long), got dtype {tokens.dtype}; "
            f"e.g. torch.randint(0, {config.num_tokens}, (1, 128))"
        )
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > max_len and config.use_abs_pos_emb:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the limit {max_len} "
                         f"(max_seq_len={config.max_seq_len}, where the learned absolute positions end)")
    if torch.compiler.is_compiling():
        return  # the id range is data: reading it back would break the compiled graph
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= config.num_tokens:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range [0, {config.num_tokens})")


def _check_inputs(tokens: Tensor, positions: Tensor | None, key_mask: Tensor | None, targets: Tensor | None,
                  config: Config) -> None:
    """Shapes and dtypes of the optional per-token inputs, which must match `tokens` (B, T)."""
    shape = tuple(tokens.shape)
    for name, value, integer in (("positions", positions, True), ("key_mask", key_mask, False),
                                 ("targets", targets, True)):
        if value is None:
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of the tokens' shape {shape}, got {found}")
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{name} must hold integers (torch.long), got dtype {value.dtype}")
        if not integer and value.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor (True for real tokens), got dtype {value.dtype}")
    if positions is not None and not torch.compiler.is_compiling():
        if int(positions.min()) < 0:
            raise ValueError(f"positions must be >= 0, got {int(positions.min())}")
        if config.use_abs_pos_emb and int(positions.max()) >= config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond the learned absolute positions "
                             f"(max_seq_len={config.max_seq_len})")
    if targets is not None and not torch.compiler.is_compiling():
        bad = targets[(targets != -100) & ((targets < 0) | (targets >= config.num_tokens))]
        if bad.numel():
            raise ValueError(f"target id {int(bad[0])} is out of range [0, {config.num_tokens}) (or -100 to ignore)")

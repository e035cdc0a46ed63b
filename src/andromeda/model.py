"""The decoder-only Transformer: token embedding, pre-norm blocks, final norm, logits.

Shape letters: B batch, T positions, C model width, V vocabulary.

Reads top-down: FeedForward, Block, then Transformer. Attention, positions and the KV cache live
in attention.py and positions.py; loss, sampling and the cache's lifecycle belong to the wrapper.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from .attention import Attention, AttentionInputs, KVCache, query_head_order
from .config import Config
from .fused import Workspace, feed_forward
from .positions import alibi_slopes, xpos_tables


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
        return feed_forward(x, self.proj_in.weight, self.proj_in.bias, self.proj_out.weight,
                            self.proj_out.bias, workspace)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.attn = Attention(config, layer)
        self.ff_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor, inputs: AttentionInputs, workspace: Workspace) -> Tensor:
        x = x + self.attn(self.attn_norm(x), inputs)
        return x + self.ff(self.ff_norm(x), workspace)


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.dim) if config.use_abs_pos_emb else None
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.depth))
        self.final_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        slopes = alibi_slopes(config.num_alibi_heads, config.heads)
        order = query_head_order(config.heads, config.attn_kv_heads)
        # Plain attributes, not buffers: a meta-device build must not leave them uninitialised,
        # and casting the model to bf16 must not round them.
        self._slopes = [slopes[h] for h in order] if config.num_alibi_heads else None
        self._slopes_on: dict[torch.device, Tensor] = {}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth).

        Each weight draws from its own generator seeded off the global one, so the init is
        reproducible under torch.manual_seed and can fill weights on all CPU threads at once
        (one thread's normal_ takes ~25 s for the 2.5 B default).
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        normal: list[tuple[Tensor, float]] = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("to_out", "proj_out")) else 0.02
                normal.append((module.weight, std))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal.append((module.weight, 0.02))
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
        cache: KVCache | None = None,
        *,
        return_hidden: bool = False,
        validate: bool = True,
    ) -> Tensor:
        """Logits (B, T, V); or, with `return_hidden`, the final-normed hidden states (B, T, C),
        which the loss projects to logits a chunk at a time (see `to_logits`).

        With a cache, `tokens` are the next positions after those already cached.
        `validate=False` skips the token checks, for ids the library produced itself.
        """
        if validate:
            check_tokens(tokens, self.config, offset=cache.length if cache is not None else 0)
        x = self.token_emb(tokens.long())  # (B, T, C)
        inputs = self._attention_inputs(tokens, cache)
        if self.pos_emb is not None:
            x = x + self._abs_positions(inputs, cache) * self.config.dim**-0.5
        workspace = Workspace()  # the blocks' shared scratch, freed with this forward's graph
        for block in self.blocks:
            x = block(x, inputs, workspace)
        if cache is not None:
            cache.length += tokens.shape[1]
        x = self.final_norm(x)
        return x if return_hidden else self.to_logits(x)

    def _attention_inputs(self, tokens: Tensor, cache: KVCache | None) -> AttentionInputs:
        device, T = tokens.device, tokens.shape[1]
        start = cache.length if cache is not None else 0
        k_pos = torch.arange(start + T, device=device)  # (S,)
        q_pos = k_pos[start:]  # (T,)
        # xPos center: T // 2 uncached, as in x-transformers; a cache fixes it for all steps.
        center = cache.xpos_center if cache is not None else T // 2
        rotary = None
        if self.config.rotary_xpos:
            rotary = xpos_tables(q_pos, self.config.rotary_dim, self.config.rotary_base,
                                 self.config.xpos_scale_base, center)
        slopes = None
        if self._slopes is not None:
            if torch.compiler.is_compiling():  # a dict filled in forward would force a recompile
                slopes = torch.tensor(self._slopes, device=device)
            else:
                if device not in self._slopes_on:
                    self._slopes_on[device] = torch.tensor(self._slopes, device=device)
                slopes = self._slopes_on[device]
        key_mask = None
        if cache is not None and cache.key_mask is not None:
            key_mask = cache.key_mask[:, : start + T]
        return AttentionInputs(q_pos, k_pos, rotary, slopes, key_mask, cache)

    def _abs_positions(self, inputs: AttentionInputs, cache: KVCache | None) -> Tensor:
        """Learned absolute positions (B or 1, T, C), counted from each row's first real token."""
        if inputs.key_mask is None:
            return self.pos_emb(inputs.q_pos)[None]
        pad = (~cache.key_mask).sum(dim=1, keepdim=True)  # (B, 1) left-padding per row
        return self.pos_emb((inputs.q_pos[None] - pad).clamp(min=0))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_tokens(tokens: Tensor, config: Config, offset: int = 0, max_len: int | None = None) -> None:
    """Raise a ValueError/TypeError naming the problem for anything but valid (B, T) token ids.

    `offset` counts positions already in a KV cache; `max_len` defaults to max_seq_len.
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
    if offset + tokens.shape[1] > max_len:
        raise ValueError(f"sequence length {offset + tokens.shape[1]} exceeds the limit {max_len} "
                         f"(max_seq_len={config.max_seq_len})")
    if torch.compiler.is_compiling():
        return  # the id range is data: reading it back would break the compiled graph
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= config.num_tokens:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range [0, {config.num_tokens})")

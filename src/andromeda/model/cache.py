"""The KV cache: preallocated keys and values of every layer, one slot per sequence.

Shape letters: L layers, N slots, K key/value heads, P capacity (positions per slot), D head
size, B rows of the current call, T new positions per row, S key positions read.

Each slot holds one sequence with its own length, so a batch may mix sequences of different
lengths, admitted at different times: the building block of continuous batching (llama.cpp's
server slots, vLLM's sequences). A call names the slots its rows are (`slots`); the cache writes
the new keys and values at each slot's own length and hands back, per layer, every key the rows
may read, with the positions and a validity mask that attention turns into its bias. A slot is
freed with `reset` and reused by the next sequence; stale entries of the previous one are never
read, because `valid` is cleared.

Sliding window (`window=W`, `sink_tokens=S`; StreamingLLM, Xiao et al. 2023,
https://arxiv.org/abs/2309.17453). The slot is a ring buffer: the token at position p is written
in place at column p for p < S (the sinks, never overwritten) and at S + (p - S) mod (P - S)
otherwise, so a sequence runs on forever in fixed memory, with no copies. A query at position i
reads the sinks and the keys at positions j > i - (W - S); positions keep counting, so ALiBi and
xPos see true distances. P >= W: a call of T new tokens needs P >= W + T - 1, so that its first
query still finds its whole window (`max_new_positions`). Padding is written to one extra
column that is never read.

Keys are stored after QK-norm and rotation, xPos scale included, and only for the K key/value
heads (grouped-query attention). xPos scales a key by zeta^-((j - c) / base) for a center c that
cancels in q.k as long as the query uses the same one; each slot keeps its own center, and every
position a call writes or queries lies within `positions.xpos_reach` of it (12,086 positions for
base 512 in fp32 and bf16), so no factor overflows. A slot's first call sets its center to its
first position plus the reach; when later positions pass the center plus the reach, the center
moves forward and the slot's stored keys are rescaled once, in place (only shrinking: keys far
behind go towards 0, as their true products with any query do). Long generations pay that one
pass over the slot every ~24,000 positions; a single call may span at most 2 * reach + 1 positions.

int8 storage (`kv_dtype="int8"`; issue #25). Keys and values are stored as int8 with one scale
per (layer, slot, key/value head, position): symmetric absmax over the D channels of each token's
head, the scale held in the compute dtype (`dtype`), so entries are written once and never
requantized as tokens are appended, truncated or copied (KIVI, Liu et al. 2024,
https://arxiv.org/abs/2402.02750, scales keys per channel, which needs groups of tokens kept in
full precision until they fill). Reads dequantize the rows read to `dtype`: attention sees keys
and values as before. xPos keys are stored *without* their xPos factor (rotated, QK-normed only),
and the factor of each key read is applied on reading, from its position and the slot's center:
one scale per token cannot carry xPos, whose factor differs per rotary pair by up to e^29.6 at
`reach` from the center (the small channels of a scaled key would round to 0), and a center move
multiplies each pair by its own factor, which no per-token scale can absorb. So int8 keys never
depend on the center: moving it rescales nothing, and truncating a slot back before
`center - reach` is exact too. Bytes per token: L * K * 2 * (D + 2) for a bf16 compute dtype, vs
L * K * 2 * 2D in bf16: 16,640 vs 32,768 for the 2.5 B default (32 layers, 2 heads of 128).
Each read costs a dequantizing pass over the rows read, in every layer (no PyTorch attention
kernel reads int8). So the cache may own a decode-attention kernel (`decode_attention`, given by
the inference code that builds it, e.g. `inference.kv_attention`'s int8 kernel on the CPU): a
call of one new position per row, without autograd, stores its keys and values through it
(`DecodeAttention.store`, the same entries as the PyTorch path, in one call) and hands attention's
query to it, which reads the int8 entries as stored (`CacheStep.decode_attention`). Any cache may
also own a fused attention for such calls (`decode_sdpa`, e.g. `inference.native`'s CPU kernel,
which at a short context or over a mostly unwritten cache beats PyTorch's SDPA): attention reads
the keys and values as before and hands them to it with its mask (`CacheStep.decode_sdpa`).

State API. The cache owns its bookkeeping (keys, values, `positions`, `valid`, `lengths`,
`next_position`, xPos centers and their host-side copies); the model only appends.
`truncate(slot, n)` keeps the slot's first n positions, those before position n, and the slot
continues at position n as if only they had been written: speculative decoding rolls back
rejected tokens, a server reuses a prompt's prefix (llama.cpp's `llama_kv_cache_seq_rm`).
`copy_prefix(src, dst, n)` makes `dst` hold the first n positions of `src`, dropping what dst
held and leaving src as it was: n choices for one prompt, or requests sharing a prefix, prefill
it once (nanochat's `KVCache.prefill`). n counts positions, so padding the slot holds (left-padded
prompts, a server's padded prefill chunks) is kept or dropped with the position it sits at;
0 <= n <= `next_position` (for a slot written from position 0, its length). Both refuse with a
ValueError, changing nothing, what they cannot do exactly:
- xPos: the kept keys stay scaled to the slot's center, so truncation keeps the center and a copy
  carries its source's. That is exact: the center cancels in q.k as long as queries use the same
  one, and they do (a fresh slot would pick another center and get the same products). The slot
  continues at position n, which must lie within `reach` of the center, as every written
  position does. Once the center has moved forward (past ~24,000 positions) the keys behind it
  are shrunk, some to nothing, and moving it back would scale them up again with what rounding
  did to them: a slot cannot be cut back to before `center - reach` (the error says so; reset it
  and prefill again).
- Ring buffers: the token at position n reads the sinks and positions n - (W - S) + 1 .. n - 1.
  Until the slot wraps (its positions stay below P) nothing has been overwritten and any n works.
  Once it has (position p + P - S written over p), only an n whose window the slot still holds
  works: n >= highest position written - P + W, or n <= S (the sinks alone). A wrapped slot can
  thus always drop its last P - W + 1 positions (`max_new_positions`: one chunk of `generate`'s
  and the server's caches); anything further back is refused with the slot, its length, the
  window and the range that works.
  Positions are assumed to keep counting (as every caller writes them); a non-ring slot whose
  positions go back is refused, since its first n positions are then no prefix of its entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ..choices import KV_CACHE_DTYPES
from ..config import Config
from .positions import xpos_max_factor, xpos_reach, xpos_scale

# What `kv_dtype` may name: "auto" stores keys and values in the compute dtype (`dtype`), "int8"
# as int8 with a scale per token and head (module docstring).
INT8_MAX = 127  # symmetric: -127..127, so that -x quantizes to minus what x does


class DecodeAttention(Protocol):
    """A decode-attention kernel the cache owns (module docstring), for calls of one new position
    per row: `store` writes a layer's new keys and values (B, K, 1, D) as `CacheStep.store`'s
    PyTorch path would; a call (step, layer, queries (B, H, 1, D) rotated and QK-normed, ALiBi
    slopes (H,) or None, logit scale) returns (B, H, 1, D) in the queries' dtype, reading the
    layer's keys and values (the new ones stored) as `attention.attend` would."""

    def store(self, step: CacheStep, layer: int, k: Tensor, v: Tensor) -> None: ...

    def __call__(self, step: CacheStep, layer: int, q: Tensor, slopes: Tensor | None, scale: float) -> Tensor: ...


class DecodeSDPA(Protocol):
    """A fused attention the cache may own for calls of one new position per row that read its
    keys and values in the compute dtype (module docstring): (q (B, K, G, D), the G query heads of
    each key/value head; k, v (B, K, S, D); additive mask broadcast to (B, K, G, S); logit scale)
    -> (B, K, G, D), what F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    computes, to rounding."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor: ...


def resolve_kv_dtype(kv_dtype: str | torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype keys and values are stored in for `kv_dtype` ("auto", "int8", or a torch dtype
    among those) with compute dtype `dtype`; a ValueError naming the choices otherwise."""
    if kv_dtype in ("auto", dtype):
        return dtype
    if kv_dtype in ("int8", torch.int8):
        return torch.int8
    raise ValueError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)} (auto: the compute dtype, "
                     f"{dtype}), got {kv_dtype!r}")


class KVCache:
    def __init__(self, config: Config, slots: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str, window: int | None = None, sink_tokens: int = 0,
                 kv_dtype: str | torch.dtype = "auto", decode_attention: DecodeAttention | None = None,
                 decode_sdpa: DecodeSDPA | None = None) -> None:
        """`dtype`: the compute dtype (activations' and the keys attention reads); `kv_dtype`:
        what they are stored in, "auto" (`dtype`) or "int8" (module docstring);
        `decode_attention`: a kernel for calls of one new position per row that reads the entries
        as stored; `decode_sdpa`: a fused attention for such calls over the entries as read
        (module docstring)."""
        kv_dtype = resolve_kv_dtype(kv_dtype, dtype)
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got slots={slots}, "
                             f"capacity={capacity}")
        check_window(window, sink_tokens)
        if window is not None and capacity < window:
            raise ValueError(f"a sliding-window KV cache needs capacity >= window, got capacity={capacity}, "
                             f"window={window}")
        # A ring buffer has one more column, where padding is written and never read.
        columns = capacity + (window is not None)
        shape = (config.depth, slots, config.attn_kv_heads, columns, config.dim_head)  # (L, N, K, P, D)
        self.dtype = dtype
        self.k = torch.zeros(shape, dtype=kv_dtype, device=device)
        self.v = torch.zeros(shape, dtype=kv_dtype, device=device)
        # int8: one scale per token and head, in the compute dtype, so that int8 * scale is
        # already in it. (L, N, K, P, 1)
        self.k_scale = self.v_scale = None
        if self.quantized:
            self.k_scale = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)
            self.v_scale = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)
        # Each layer's index into the stacked (L, ...) tensors, as a tensor: an indexed write then
        # goes to the stacked tensor itself, which torch.compile updates in place (through the view
        # of one layer, its graph copied every layer's whole cache each step).
        self.layer_ids = [torch.tensor(layer, device=device) for layer in range(config.depth)]
        self.positions = torch.zeros(slots, columns, dtype=torch.long, device=device)  # (N, P)
        self.valid = torch.zeros(slots, columns, dtype=torch.bool, device=device)  # (N, P)
        self.centers = torch.zeros(slots, dtype=torch.float32, device=device)  # (N,) xPos centers
        self.next_position = torch.zeros(slots, dtype=torch.long, device=device)  # (N,)
        self.lengths = [0] * slots  # entries written per slot (host side: no device sync to read)
        self.capacity = capacity
        self.window, self.sink_tokens = window, sink_tokens
        self.config = config
        self.decode_attention = decode_attention
        self.decode_sdpa = decode_sdpa
        # Host-side copies: which center each slot has (None: not set yet), its next position.
        self._centers: list[int | None] = [None] * slots
        self._next: list[int] = [0] * slots
        # Ring buffers: the highest position each slot wrote since its reset, as of its last
        # truncation (`_next` covers the appends since): what later positions overwrote.
        self._highest: list[int] = [-1] * slots
        self.reach = xpos_reach(config.xpos_scale_base, dtype) if config.rotary_xpos else None

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def quantized(self) -> bool:
        """Whether keys and values are stored as int8 with per-token scales."""
        return self.k.dtype == torch.int8

    @property
    def storage(self) -> tuple[Tensor, ...]:
        """Every tensor keys and values are written to (for `torch._dynamo.mark_static_address`)."""
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values (scales included) one position takes in one slot."""
        return sum(t[:, 0, :, 0].nbytes for t in self.storage)  # (L, K, D) or (L, K, 1) each

    @property
    def max_new_positions(self) -> int:
        """The most consecutive positions one call may add to a slot: the capacity, or in a ring
        buffer what fits beside a full window; and no more than one xPos center covers."""
        return min(limit for limit, _ in self._limits())

    def _limits(self) -> list[tuple[int, str]]:
        limits = [(self.capacity, "the capacity")]
        if self.window is not None:
            limits.append((self.capacity - self.window + 1, f"beside a full window of {self.window}"))
        if self.reach is not None:
            limits.append((2 * self.reach + 1, f"around one xPos center in {self.dtype}"))
        return limits

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Free `slots` (default: all) for new sequences."""
        slots = range(self.num_slots) if slots is None else slots
        for slot in slots:
            self.lengths[slot] = 0
            self._centers[slot] = None
            self._next[slot] = 0
            self._highest[slot] = -1
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.valid.device)
        self.valid[index] = False
        self.next_position[index] = 0

    def truncate(self, slot: int, n: int) -> None:
        """Keep the first `n` positions of `slot` (those before position n); it continues at
        position n. Refuses, changing nothing, what it cannot do exactly (module docstring)."""
        self._check_slot(slot, "slot")
        kept = self._check_prefix(slot, n)
        self._cut(slot, n, kept)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make slot `dst` hold the first `n` positions of slot `src`, with src's xPos center
        (its keys are scaled to it); whatever dst held is dropped, src is left as it was.
        Refuses, changing nothing, what `truncate(src, n)` would refuse."""
        self._check_slot(src, "src")
        self._check_slot(dst, "dst")
        if src == dst:
            raise ValueError(f"copy_prefix needs two different slots, got src = dst = {src}; "
                             f"truncate shortens a slot in place")
        kept = self._check_prefix(src, n)
        columns = kept.columns if self.window is None else self.positions.shape[1]  # a ring: all
        for tensor in self.storage:
            tensor[:, dst, :, :columns] = tensor[:, src, :, :columns]  # (L, K, columns, D or 1)
        self.positions[dst, :columns] = self.positions[src, :columns]
        self.valid[dst, :columns] = self.valid[src, :columns]  # a plain slot's later columns: `_cut`
        self.centers[dst] = self.centers[src]
        self.next_position[dst] = self.next_position[src]
        self.lengths[dst] = columns if self.window is None else self.lengths[src]
        self._centers[dst], self._next[dst] = self._centers[src], self._next[src]
        self._highest[dst] = self._highest[src]
        self._cut(dst, n, kept)

    def _check_slot(self, slot: int, name: str) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"{name} must be a slot index in [0, {self.num_slots}), got {slot!r}")

    def _check_prefix(self, slot: int, n: int) -> _Kept:
        """What keeping the positions before `n` of `slot` keeps; a ValueError naming the
        problem, and what would work, where that cannot be done exactly."""
        length = self._next[slot]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= length:
            holds = f"holds positions up to {length - 1}" if length else "is empty"
            raise ValueError(f"n must be a number of positions in [0, {length}] (KV cache slot {slot} {holds}), "
                             f"got {n!r}")
        if self.window is None:
            before = self.positions[slot, : self.lengths[slot]] < n  # (entries,)
            columns = int(before.sum())
            if not bool(before[:columns].all()):
                raise ValueError(f"KV cache slot {slot}: its positions do not increase along its entries, so "
                                 f"those before {n} are no prefix of them and cannot be kept alone")
            kept = _Kept(columns, bool(self.valid[slot, :columns].any()))
        else:
            kept = _Kept(None, bool((self.valid[slot] & (self.positions[slot] < n)).any()))
        if kept.keys and n < length:
            if not self.quantized:  # int8 keys are stored without xPos factors: any center works
                self._check_center(slot, n)
            if self.window is not None:
                self._check_window(slot, n)
        return kept

    def _check_center(self, slot: int, n: int) -> None:
        center = self._centers[slot]
        if center is not None and n < center - self.reach:
            raise ValueError(f"KV cache slot {slot}: its xPos center has moved to position {center} (its keys are "
                             f"scaled to it), which covers positions from {center - self.reach} on; continuing at "
                             f"position {n} would move it back and scale the keys it shrank up again, rounding "
                             f"errors and all. Truncate it to at least {center - self.reach} positions, or reset "
                             f"the slot and prefill again")

    def _check_window(self, slot: int, n: int) -> None:
        """A ring slot cut to n positions must still hold the window its next token reads."""
        window, sinks, columns = self.window, self.sink_tokens, self.capacity
        highest = max(self._highest[slot], self._next[slot] - 1)
        overwritten = highest - (columns - sinks)  # every position from the sinks to this may be gone
        needed = max(sinks, n - (window - sinks) + 1)  # the oldest non-sink position n reads
        if needed <= n - 1 and needed <= overwritten:
            length = self._next[slot]
            raise ValueError(f"KV cache slot {slot} is a ring buffer that has wrapped: of its {length} positions, "
                             f"its {columns} columns for a window of {window} tokens ({sinks} sinks) keep the "
                             f"sinks and the positions from {overwritten + 1} on, so it cannot be truncated below "
                             f"its window: {n} positions need positions {needed}..{n - 1}. It can be truncated to "
                             f"{overwritten + window - sinks}..{length} positions, or to at most {sinks} (the sink "
                             f"tokens alone); or reset the slot and prefill again")

    def _cut(self, slot: int, n: int, kept: _Kept) -> None:
        """Drop the positions from `n` on of `slot`, whose state `_check_prefix` found `kept`."""
        if self.window is None:
            self.valid[slot, kept.columns :] = False
            self.lengths[slot] = kept.columns
        else:
            self.valid[slot] &= self.positions[slot] < n
            # A ring's count of entries drops by one per position dropped (its padding is not kept).
            dropped = self._next[slot] - n
            self.lengths[slot] = max(0, self.lengths[slot] - dropped) if kept.keys else 0
            self._highest[slot] = max(self._highest[slot], self._next[slot] - 1) if kept.keys else -1
        if not kept.keys:  # nothing left that is scaled to the center: the next call places one
            self._centers[slot] = None
        self._next[slot] = n
        self.next_position[slot] = n

    def append(self, slots: Sequence[int] | None, positions: Tensor | None, key_mask: Tensor | None,
               new: int, *, read_all: bool = False) -> CacheStep:
        """Reserve `new` entries in each of `slots` (one per row; default: slot b for row b) for
        tokens at `positions` (B, T) (default: each slot's next position onward), marking those
        where `key_mask` (B, T) is False as padding. Returns what this call's layers read and write.

        read_all: the queries read all `capacity` columns (the unwritten ones masked as invalid)
        and the keys are written by index, so every call of `new` tokens has the same shapes, as
        a compiled decode step with CUDA graphs needs. Otherwise they read the columns written
        so far, which grow by `new` each call. (A ring buffer is always read whole.)"""
        if slots is None:
            slots = range(positions.shape[0] if positions is not None else self.num_slots)
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(0 <= s < self.num_slots for s in slots):
            raise ValueError(f"slots must be distinct indices in [0, {self.num_slots}), got {slots}")
        starts = [self.lengths[s] for s in slots]
        if self.window is None:
            for slot, start in zip(slots, starts):
                if start + new > self.capacity:
                    raise ValueError(f"KV cache slot {slot} holds {start} positions; {new} more exceed its "
                                     f"capacity {self.capacity}")
        device = self.valid.device
        index = torch.tensor(slots, dtype=torch.long, device=device)  # (B,)
        offsets = torch.arange(new, device=device)  # (T,)
        if positions is None:
            positions = self.next_position[index][:, None] + offsets  # (B, T)
            spans = [(self._next[s], self._next[s] + new - 1) for s in slots]
            lasts = [hi for _, hi in spans]
        else:
            spans, lasts = _real_spans(positions, key_mask)
        self._check_spans(slots, spans)
        if self.reach is not None:
            self._place_centers(slots, spans)
        if self.window is None:
            columns = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + offsets  # (B, T)
        else:
            columns = self._ring_columns(positions, key_mask)
        self.positions[index[:, None], columns] = positions
        self.valid[index[:, None], columns] = True if key_mask is None else key_mask
        self.next_position[index] = positions[:, -1] + 1
        for slot, last in zip(slots, lasts):
            self.lengths[slot] += new
            self._next[slot] = last + 1
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if contiguous else index
        if self.window is None and not read_all:
            read = max(starts) + new
            start = starts[0] if len(set(starts)) == 1 else None
            window = None
        elif self.window is None:
            read, start, window = self.capacity, None, None
        else:  # a ring buffer is read whole; its columns are not in position order
            read, start, window = self.capacity, None, (self.window, self.sink_tokens)
        k_pos, center = self.positions[rows, :read], self.centers[index][:, None]
        decoding = new == 1 and not torch.is_grad_enabled()  # (the kernels have no backward)
        decode = self.decode_attention if decoding else None
        factors = None
        if self.quantized and self.reach is not None:  # int8 keys are stored without xPos factors
            factors = (1 / self._key_factors(positions, center, torch.float32),
                       None if decode is not None else self._key_factors(k_pos, center, self.dtype))
        return CacheStep(self, rows, index, columns, start, new, read, positions, k_pos, self.valid[rows, :read],
                         center, window, factors, decode, self.decode_sdpa if decoding else None)

    def _key_factors(self, positions: Tensor, center: Tensor, dtype: torch.dtype) -> Tensor:
        """The xPos factor of keys at `positions` (B, S) around `center` (B, 1), per channel of the
        rotary part: (B, 1, S, R), capped as the forward pass caps it (`positions.xpos_fold`), so a
        position past `reach` (a stale or padding entry) gets a finite factor."""
        config = self.config
        scale = xpos_scale(positions, config.rotary_dim, config.xpos_scale_base, center)  # (B, 1, S, R/2)
        factor = 1 / scale.clamp(min=1 / xpos_max_factor(self.dtype))
        return factor.repeat_interleave(2, dim=-1).to(dtype)  # pairs are adjacent channels (GPT-J layout)

    def _check_spans(self, slots: list[int], spans: list[tuple[int, int] | None]) -> None:
        """A call's real positions must fit beside a full window (ring buffer) and around one
        xPos center; the capacity limits entries, checked apart, not the positions' span."""
        for limit, what in self._limits()[1:]:
            for slot, span in zip(slots, spans):
                if span is not None and span[1] - span[0] + 1 > limit:
                    raise ValueError(f"KV cache slot {slot}: this call's positions {span[0]}..{span[1]} span "
                                     f"{span[1] - span[0] + 1}, more than the {limit} that fit {what}; "
                                     f"feed them in chunks of at most {limit} positions")

    def _place_centers(self, slots: list[int], spans: list[tuple[int, int] | None]) -> None:
        """Give each slot an xPos center within `reach` of all its new positions, moving it
        forward (and rescaling the slot's stored keys to match) when they have run past it."""
        reach = self.reach
        for slot, span in zip(slots, spans):
            if span is None:  # padding only
                continue
            low, high = span
            center = self._centers[slot]
            if center is not None and center - reach <= low and high <= center + reach:
                continue
            moved = low + reach
            if center is not None:
                self._rescale_keys(slot, center, moved)
            self._centers[slot] = moved
            self.centers[slot] = moved

    def _rescale_keys(self, slot: int, old: int, new: int) -> None:
        """Keys stored as zeta^-((j - old) / base) become zeta^-((j - new) / base): times
        zeta^((new - old) / base) per rotary pair, in place, for every layer."""
        if self.quantized:  # stored without xPos factors (module docstring): nothing to rescale
            return
        config = self.config
        position = torch.tensor([[new]], device=self.k.device)
        factor = xpos_scale(position, config.rotary_dim, config.xpos_scale_base, old).flatten()  # (R/2,)
        rotary = self.k[:, slot, :, :, : config.rotary_dim]  # (L, K, P, R)
        rotary.mul_(factor.repeat_interleave(2))  # pairs are adjacent channels (GPT-J layout)

    def _ring_columns(self, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        """Where each token goes in a ring buffer: (B, T) columns, padding to the extra column."""
        sinks, ring = self.sink_tokens, self.capacity - self.sink_tokens
        columns = torch.where(positions < sinks, positions, sinks + (positions - sinks) % ring)
        if key_mask is not None:
            columns = columns.masked_fill(~key_mask, self.capacity)
        return columns


def check_window(window: int | None, sink_tokens: int) -> None:
    """Raise a ValueError naming the problem unless `window` (None, or a number of tokens that
    includes the sinks) and `sink_tokens` make a sliding window."""
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
    if window is None:
        if sink_tokens:
            raise ValueError(f"sink_tokens={sink_tokens} needs a sliding window; give window too")
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    if window < sink_tokens + 1:
        raise ValueError(f"window {window} must be at least sink_tokens + 1 = {sink_tokens + 1}: it holds the "
                         f"{sink_tokens} sink tokens plus at least one recent token")


def _real_spans(positions: Tensor, key_mask: Tensor | None) -> tuple[list[tuple[int, int] | None], list[int]]:
    """Per row, the first and last position of its real tokens (None for a row of padding only),
    and its last position: read back in one small copy."""
    last = positions[:, -1]
    if key_mask is None:
        low, high = positions[:, 0], last
    else:
        big = torch.iinfo(positions.dtype).max
        low = positions.masked_fill(~key_mask, big).amin(dim=1)
        high = positions.masked_fill(~key_mask, -1).amax(dim=1)
    rows = torch.stack((low, high, last), dim=1).tolist()  # (B, 3)
    spans = [(lo, hi) if hi >= 0 else None for lo, hi, _ in rows]
    return spans, [row[2] for row in rows]


@dataclass
class CacheStep:
    """One call's view of the cache: where its new keys go and which keys its queries read."""

    cache: KVCache
    rows: slice | Tensor  # the slots of the rows: a slice when they are consecutive (views, no copies)
    index: Tensor  # (B,) the slots of the rows
    columns: Tensor  # (B, T) where each new entry goes
    start: int | None  # the common first column when every row starts there (and in order), else None
    new: int  # T
    read: int  # S: entries read per row, [0, S)
    q_pos: Tensor  # (B, T) positions of the new tokens
    k_pos: Tensor  # (B, S) positions of the keys read
    k_valid: Tensor  # (B, S) which of them hold real tokens
    center: Tensor  # (B, 1) xPos center of each row
    window: tuple[int, int] | None = None  # (W, S) of a sliding-window cache
    # An int8 cache of an xPos model: the inverse key factors of the new positions (B, 1, T, R)
    # fp32, multiplied in before quantizing, and the factors of the positions read (B, 1, S, R),
    # applied on reading (None when `decode_attention` reads them itself).
    xpos_factors: tuple[Tensor, Tensor] | None = None
    # The cache's decode-attention kernel where this call may use it (one new position per row, no
    # autograd), else None: attention then stores with `store` and attends through it.
    decode_attention: DecodeAttention | None = None
    # The cache's fused attention where this call may use it (one new position per row, no
    # autograd), else None: attention then reads the keys and values as `read_layer` gives them
    # and attends with it.
    decode_sdpa: DecodeSDPA | None = None

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new (B, K, T, D) keys and values of `layer`; return all the rows read:
        (B, K, S, D) each, in the compute dtype."""
        self.store(layer, k, v)
        return self.read_layer(layer)

    def store(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store the new (B, K, T, D) keys and values of `layer`, as the cache keeps them."""
        cache = self.cache
        if not cache.quantized:
            self._store(cache.k, layer, k)
            self._store(cache.v, layer, v)
            return
        if self.decode_attention is not None:  # one position per row: the kernel stores as it reads
            self.decode_attention.store(self, layer, k, v)
            return
        if self.xpos_factors is not None:
            k = _scale_rotary(k.float(), self.xpos_factors[0])
        # Keys and values quantized together: half the small ops, which dominate a decode step's store.
        quantized, scale = quantize_int8(torch.stack((k.float(), v.float())), cache.dtype)  # (2, B, K, T, D or 1)
        for stored, scales, index in ((cache.k, cache.k_scale, 0), (cache.v, cache.v_scale, 1)):
            self._store(stored, layer, quantized[index])
            self._store(scales, layer, scale[index])

    def read_layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """The keys and values of `layer` the rows read, (B, K, S, D) each in the compute dtype:
        int8 entries dequantized, with their xPos factors."""
        cache = self.cache
        if not cache.quantized:
            return cache.k[layer][self.rows, :, : self.read], cache.v[layer][self.rows, :, : self.read]
        keys, values = (dequantize_int8(q[layer][self.rows, :, : self.read], s[layer][self.rows, :, : self.read])
                        for q, s in ((cache.k, cache.k_scale), (cache.v, cache.v_scale)))  # (B, K, S, D)
        if self.xpos_factors is not None:
            factors = self.xpos_factors[1]  # (B, 1, S, R)
            keys[..., : factors.shape[-1]].mul_(factors)  # in place: `keys` is this call's own copy
        return keys, values

    def _store(self, stored: Tensor, layer: int, new: Tensor) -> None:
        """Write the new (B, K, T, D or 1) entries of `layer` into the stacked (L, N, K, P, D or 1)
        `stored`."""
        if self.start is not None and isinstance(self.rows, slice):
            stored[layer, self.rows, :, self.start : self.start + self.new] = new
        else:  # layer, rows (B, 1) and columns (B, T) index together: values (B, T, K, D)
            indices = [self.cache.layer_ids[layer], self.index[:, None], None, self.columns]
            torch.ops.aten.index_put_(stored, indices, new.transpose(1, 2))


def quantize_int8(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 over the last dimension: x (..., D) ~ q (..., D) int8 times the scale
    (..., 1) in `dtype`. The scale is rounded to `dtype` before dividing by it, so that q * scale
    is what was meant; an all-zero row gets scale 0 and q 0."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).to(dtype)
    q = (x / scale.float().clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """q (..., D) int8 times scale (..., 1), in the scale's dtype (a new tensor)."""
    return q * scale


def _scale_rotary(x: Tensor, factors: Tensor) -> Tensor:
    """x (B, K, S, D) with its first R channels times `factors` (B, 1, S, R), in x's dtype."""
    rotary = factors.shape[-1]
    if rotary == x.shape[-1]:
        return x * factors.to(x.dtype)
    return torch.cat((x[..., :rotary] * factors.to(x.dtype), x[..., rotary:]), dim=-1)


class _Kept(NamedTuple):
    """What keeping the first positions of a slot keeps."""

    columns: int | None  # the entries kept, a prefix of the columns (None in a ring buffer)
    keys: bool  # whether any real token is kept (else the slot is as if fresh)

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

Keys are stored after QK-norm and rotation, xPos scale included, and only for the K key/value
heads (grouped-query attention). xPos scales a key by zeta^-((j - c) / base) for some center c
that cancels in q.k as long as the query uses the same one; each slot fixes its center when its
first token is written (its position + capacity / 2, so every position the slot can hold stays
within half a capacity of it) and queries of that row use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import Config


class KVCache:
    def __init__(self, config: Config, slots: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got slots={slots}, "
                             f"capacity={capacity}")
        shape = (config.depth, slots, config.attn_kv_heads, capacity, config.dim_head)  # (L, N, K, P, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(slots, capacity, dtype=torch.long, device=device)  # (N, P)
        self.valid = torch.zeros(slots, capacity, dtype=torch.bool, device=device)  # (N, P)
        self.centers = torch.zeros(slots, dtype=torch.float32, device=device)  # (N,) xPos centers
        self.next_position = torch.zeros(slots, dtype=torch.long, device=device)  # (N,)
        self.lengths = [0] * slots  # entries written per slot (host side: no device sync to read)
        self.capacity = capacity

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Free `slots` (default: all) for new sequences."""
        slots = range(self.num_slots) if slots is None else slots
        for slot in slots:
            self.lengths[slot] = 0
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.valid.device)
        self.valid[index] = False
        self.next_position[index] = 0

    def append(self, slots: Sequence[int] | None, positions: Tensor | None, key_mask: Tensor | None,
               new: int) -> CacheStep:
        """Reserve `new` entries in each of `slots` (one per row; default: slot b for row b) for
        tokens at `positions` (B, T) (default: each slot's next position onward), marking those
        where `key_mask` (B, T) is False as padding. Returns what this call's layers read and write."""
        if slots is None:
            slots = range(positions.shape[0] if positions is not None else self.num_slots)
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(0 <= s < self.num_slots for s in slots):
            raise ValueError(f"slots must be distinct indices in [0, {self.num_slots}), got {slots}")
        starts = [self.lengths[s] for s in slots]
        for slot, start in zip(slots, starts):
            if start + new > self.capacity:
                raise ValueError(f"KV cache slot {slot} holds {start} positions; {new} more exceed its "
                                 f"capacity {self.capacity}")
        device = self.valid.device
        index = torch.tensor(slots, dtype=torch.long, device=device)  # (B,)
        offsets = torch.arange(new, device=device)  # (T,)
        if positions is None:
            positions = self.next_position[index][:, None] + offsets  # (B, T)
        # A slot's center is fixed by its first token (see the module docstring).
        first = torch.tensor([start == 0 for start in starts], device=device)
        self.centers[index] = torch.where(first, positions[:, 0].float() + self.capacity // 2,
                                          self.centers[index])
        columns = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + offsets  # (B, T)
        self.positions[index[:, None], columns] = positions
        self.valid[index[:, None], columns] = True if key_mask is None else key_mask
        self.next_position[index] = positions[:, -1] + 1
        for slot in slots:
            self.lengths[slot] += new
        read = max(starts) + new
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if contiguous else index
        same_start = len(set(starts)) == 1
        return CacheStep(self, rows, index, columns, starts[0] if same_start else None, new, read,
                         positions, self.positions[rows, :read], self.valid[rows, :read],
                         self.centers[index][:, None])


@dataclass
class CacheStep:
    """One call's view of the cache: where its new keys go and which keys its queries read."""

    cache: KVCache
    rows: slice | Tensor  # the slots of the rows: a slice when they are consecutive (views, no copies)
    index: Tensor  # (B,) the slots of the rows
    columns: Tensor  # (B, T) where each new entry goes
    start: int | None  # the common first column when every row starts there, else None
    new: int  # T
    read: int  # S: entries read per row, [0, S)
    q_pos: Tensor  # (B, T) positions of the new tokens
    k_pos: Tensor  # (B, S) positions of the keys read
    k_valid: Tensor  # (B, S) which of them hold real tokens
    center: Tensor  # (B, 1) xPos center of each row

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new (B, K, T, D) keys and values of `layer`; return all the rows read:
        (B, K, S, D) each."""
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]  # (N, K, P, D)
        if self.start is not None and isinstance(self.rows, slice):
            columns = slice(self.start, self.start + self.new)
            cache_k[self.rows, :, columns] = k
            cache_v[self.rows, :, columns] = v
        else:
            rows = self.index[:, None]  # (B, 1) against columns (B, T): values (B, T, K, D)
            cache_k[rows, :, self.columns] = k.transpose(1, 2)
            cache_v[rows, :, self.columns] = v.transpose(1, 2)
        return cache_k[self.rows, :, : self.read], cache_v[self.rows, :, : self.read]

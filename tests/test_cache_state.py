"""The KV cache's state API: after `truncate` or `copy_prefix`, a slot continues exactly as one that
was only ever fed the positions it kept (speculative rollback, prefix reuse, forks), its source is
untouched, xPos centers and ring buffers included; what cannot be done exactly is refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from andromeda import KVCache
from helpers import random_net

VOCAB = 258
# xPos with scale base 8: one center covers 188 positions either side (`positions.xpos_reach`), so
# a few hundred tokens move it, as ~24,000 do at the real base of 512.
SHORT_XPOS = dict(xpos_scale_base=8.0)
EXACT = dict(atol=1e-5, rtol=1e-5)
PROPERTY = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module")
def net():
    return random_net().eval()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def new_cache(net, slots: int = 1, capacity: int = 48, **ring) -> KVCache:
    return KVCache(net.config, slots, capacity, dtype=torch.float32, device="cpu", **ring)


@torch.no_grad()
def feed(net, cache: KVCache, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """Logits (1, T, V) of feeding x into `slot`, in chunks the cache takes in one call."""
    chunk = cache.max_new_positions
    parts = [net(x[:, i : i + chunk], cache=cache, slots=[slot]) for i in range(0, x.shape[1], chunk)]
    return torch.cat(parts, dim=1) if parts else torch.empty(1, 0, VOCAB)


def fresh(net, prefix: torch.Tensor, x: torch.Tensor, **cache_args) -> torch.Tensor:
    """Recomputing from scratch: a new slot fed `prefix`, then x; x's logits."""
    cache = new_cache(net, **cache_args)
    feed(net, cache, prefix)
    return feed(net, cache, x)


@torch.no_grad()
def uncached(net, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return net(torch.cat((prefix, x), dim=1))[:, prefix.shape[1] :]


def assert_same_state(cache: KVCache, slot: int, reference: KVCache) -> None:
    """`slot` keeps the bookkeeping of slot 0 of a cache that was fed only what it kept."""
    assert cache.lengths[slot] == reference.lengths[0]
    assert cache._next[slot] == reference._next[0] == int(cache.next_position[slot])
    assert cache._centers[slot] == reference._centers[0]
    assert torch.equal(cache.valid[slot], reference.valid[0])
    kept = cache.valid[slot]
    assert torch.equal(cache.positions[slot][kept], reference.positions[0][kept])


# ----------------------------------------------------------------------------- truncate


@PROPERTY
@given(kept=st.integers(0, 12), dropped=st.integers(0, 10), new=st.integers(1, 5), split=st.integers(0, 22),
       seed=st.integers(0, 2**16))
def test_a_truncated_slot_continues_as_if_fed_only_what_it_kept(net, kept, dropped, new, split, seed):
    """Prefill A + B (in two calls), truncate to len(A), feed C: C's logits are those of a fresh
    slot fed A then C, and of the uncached forward of A + C. Slot 0, longer, is fed in the same
    batched call, so the call reads past slot 1's length: dropped entries must be invalid."""
    a, b, c = tokens(kept, seed), tokens(dropped, seed + 1), tokens(new, seed + 2)
    other, other_next = tokens(24, seed + 3), tokens(new, seed + 4)
    cache = new_cache(net, slots=2)
    feed(net, cache, other, slot=0)
    ab = torch.cat((a, b), dim=1)
    feed(net, cache, ab[:, :split], slot=1)
    feed(net, cache, ab[:, split:], slot=1)
    cache.truncate(1, kept)
    reference = new_cache(net)
    feed(net, reference, a)
    assert_same_state(cache, 1, reference)
    with torch.no_grad():
        logits = net(torch.cat((other_next, c)), cache=cache, slots=[0, 1])  # rows at 24 and `kept`
    torch.testing.assert_close(logits[1:], feed(net, reference, c), **EXACT)
    torch.testing.assert_close(logits[1:], uncached(net, a, c), **EXACT)
    torch.testing.assert_close(logits[:1], uncached(net, other, other_next), **EXACT)


def test_greedy_decoding_rolled_back_with_truncate_repeats_itself(net):
    """Generate, roll back (as speculative decoding drops rejected tokens), generate again: the
    same tokens, which are also those of recomputing the whole sequence at every step."""
    prompt, steps = tokens(7, 0), 12
    cache = new_cache(net)

    @torch.no_grad()
    def greedy(last: torch.Tensor, count: int) -> list[int]:
        out = []
        for _ in range(count):
            logits = net(last, cache=cache)[:, -1]
            last = logits.argmax(-1, keepdim=True)
            out.append(int(last))
        return out

    feed(net, cache, prompt[:, :-1])
    first = greedy(prompt[:, -1:], steps)
    cache.truncate(0, prompt.shape[1] + 4)  # keep the first 5 generated tokens
    assert greedy(torch.tensor([[first[4]]]), steps - 5) == first[5:]
    cache.truncate(0, prompt.shape[1] - 1)  # back to before the prompt's last token
    assert greedy(prompt[:, -1:], steps) == first
    sequence = prompt
    with torch.no_grad():
        for _ in range(steps):
            sequence = torch.cat((sequence, net(sequence)[:, -1:].argmax(-1)), dim=1)
    assert sequence[0, prompt.shape[1] :].tolist() == first
    assert len(set(first)) > 3, "a degenerate continuation would make the comparison weak"


# ----------------------------------------------------------------------------- copy_prefix


@PROPERTY
@given(length=st.integers(1, 14), data=st.data(), junk=st.integers(0, 9), new=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_a_copied_prefix_continues_as_if_fed_alone_and_leaves_its_source(net, length, data, junk, new, seed):
    """copy_prefix(src, dst, n) over a dst that held another sequence, then C into dst and D into
    src in one call (rows in slots 0 and 2): dst gives fresh A[:n] + C, src fresh A + D."""
    n = data.draw(st.integers(0, length), label="n")
    a, c, d = tokens(length, seed), tokens(new, seed + 1), tokens(new, seed + 2)
    cache = new_cache(net, slots=3)
    feed(net, cache, a, slot=0)
    feed(net, cache, tokens(junk, seed + 3), slot=2)
    cache.copy_prefix(0, 2, n)
    reference = new_cache(net)
    feed(net, reference, a[:, :n])
    assert_same_state(cache, 2, reference)
    assert cache.lengths[0] == length
    with torch.no_grad():
        logits = net(torch.cat((d, c)), cache=cache, slots=[0, 2])
    torch.testing.assert_close(logits[1:], feed(net, reference, c), **EXACT)
    torch.testing.assert_close(logits[1:], uncached(net, a[:, :n], c), **EXACT)
    torch.testing.assert_close(logits[:1], uncached(net, a, d), **EXACT)


def test_forks_of_one_prefill_decode_independently(net):
    """n choices for one prompt: the prompt prefilled once, copied to the other slots; each
    continuation equals that prompt and continuation computed alone."""
    prompt = tokens(9, 5)
    cache = new_cache(net, slots=3)
    feed(net, cache, prompt)
    cache.copy_prefix(0, 1, 9)
    cache.copy_prefix(0, 2, 9)
    continuations = torch.cat([tokens(4, seed) for seed in (6, 7, 8)])  # (3, 4)
    with torch.no_grad():
        logits = net(continuations, cache=cache)
    for row in range(3):
        torch.testing.assert_close(logits[row : row + 1], uncached(net, prompt, continuations[row : row + 1]),
                                   **EXACT)


# ----------------------------------------------------------------------------- xPos centers


def test_truncation_and_copies_keep_a_moved_xpos_center():
    """Past one center's reach the center moves and the stored keys are rescaled to it. A
    truncated slot keeps that center and a copy carries it (its keys are scaled to it): both
    continue as the exact computation does. Cutting back to before the center's reach is refused."""
    net = random_net(**SHORT_XPOS).eval()
    x, c = tokens(560, 1), tokens(20, 2)
    cache = new_cache(net, slots=2, capacity=600)
    reach = cache.reach
    assert reach == 188
    feed(net, cache, x[:, :300])
    assert cache._centers[0] == reach
    feed(net, cache, x[:, 300:])  # positions 300..559 lie beyond 188 + 188: the center moves
    moved = 300 + reach
    assert cache._centers[0] == moved
    cache.copy_prefix(0, 1, 420)
    assert cache._centers[1] == moved and float(cache.centers[1]) == moved
    cache.truncate(0, 400)
    assert cache._centers[0] == moved
    torch.testing.assert_close(feed(net, cache, c, slot=0), uncached(net, x[:, :400], c), atol=2e-5, rtol=0)
    torch.testing.assert_close(feed(net, cache, c, slot=1), uncached(net, x[:, :420], c), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match=r"KV cache slot 0: its xPos center has moved to position 488 .* covers "
                                         r"positions from 300 on; .* Truncate it to at least 300 positions"):
        cache.truncate(0, 299)
    with pytest.raises(ValueError, match="xPos center has moved to position 488"):
        cache.copy_prefix(1, 0, 150)
    assert cache._next == [420, 440] and cache.lengths == [420, 440], "a refused call changes nothing"
    cache.truncate(0, 300)  # the oldest position the center still covers
    torch.testing.assert_close(feed(net, cache, c), uncached(net, x[:, :300], c), atol=2e-5, rtol=0)
    cache.truncate(1, 0)  # emptied: the next call places a new center
    assert cache._centers[1] is None
    torch.testing.assert_close(feed(net, cache, c, slot=1), uncached(net, c[:, :0], c), **EXACT)


# ----------------------------------------------------------------------------- ring buffers

WINDOW, SINKS, COLUMNS = 8, 2, 12  # a call may add COLUMNS - WINDOW + 1 = 5 positions
RING = dict(capacity=COLUMNS, window=WINDOW, sink_tokens=SINKS)


def test_a_ring_slot_that_has_not_wrapped_truncates_anywhere(net):
    x, c = tokens(11, 3), tokens(5, 4)  # 11 positions in 12 columns: nothing overwritten yet
    for n in range(12):
        cache = new_cache(net, **RING)
        feed(net, cache, x)
        cache.truncate(0, n)
        assert not (cache.valid[0] & (cache.positions[0] >= n)).any(), "dropped positions must be invalid"
        assert cache._next[0] == n == int(cache.next_position[0])
        torch.testing.assert_close(feed(net, cache, c), fresh(net, x[:, :n], c, **RING), **EXACT)


@pytest.mark.parametrize("method", ["truncate", "copy_prefix"])
def test_a_wrapped_ring_slot_keeps_only_prefixes_whose_window_it_holds(net, method):
    """30 positions in 12 columns (2 sinks): positions 2..19 are overwritten. n positions need
    n - 6 + 1 .. n - 1 (and the sinks): so n >= 25 or n <= 2; anything else is refused by name."""
    x, c = tokens(30, 5), tokens(5, 6)
    allowed = [n for n in range(31) if n <= SINKS or n >= 25]
    for n in range(31):
        cache = new_cache(net, slots=2, **RING)
        feed(net, cache, x)
        cut = (lambda: cache.truncate(0, n)) if method == "truncate" else (lambda: cache.copy_prefix(0, 1, n))
        if n not in allowed:
            with pytest.raises(ValueError, match=rf"KV cache slot 0 is a ring buffer that has wrapped: of its 30 "
                                                 rf"positions, its 12 columns for a window of 8 tokens \(2 sinks\) "
                                                 rf"keep the sinks and the positions from 20 on, so it cannot be "
                                                 rf"truncated below its window: {n} positions need positions "
                                                 rf"{max(2, n - 5)}..{n - 1}\. It can be truncated to 25\.\.30 "
                                                 rf"positions, or to at most 2 \(the sink tokens alone\)"):
                cut()
            assert cache._next == [30, 0] and cache.lengths == [30, 0], "a refused call changes nothing"
            continue
        cut()
        slot = 0 if method == "truncate" else 1
        torch.testing.assert_close(feed(net, cache, c, slot=slot), fresh(net, x[:, :n], c, **RING), **EXACT)
        if method == "copy_prefix":  # the source continues as it would have
            torch.testing.assert_close(feed(net, cache, c), fresh(net, x, c, **RING), **EXACT)


def test_a_ring_slot_rolled_back_after_wrapping_can_roll_back_again(net):
    """What was overwritten before a rollback stays lost: position 29 wrote over 19. Cut back to
    26 and refilled only up to 28, the slot still cannot keep 24 positions (their window reads
    19); 25 still works. A copy of the slot knows as much."""
    x, c = tokens(30, 7), tokens(3, 8)
    cache = new_cache(net, slots=2, **RING)
    feed(net, cache, x)
    cache.truncate(0, 26)
    feed(net, cache, x[:, 26:29])
    cache.copy_prefix(0, 1, 29)
    for slot in (0, 1):
        with pytest.raises(ValueError, match=rf"slot {slot} .* It can be truncated to 25\.\.29 positions"):
            cache.truncate(slot, 24)
    cache.truncate(0, 25)
    torch.testing.assert_close(feed(net, cache, c), fresh(net, x[:, :25], c, **RING), **EXACT)


# ----------------------------------------------------------------------------- bad calls


def test_bad_calls_are_named_and_change_nothing(net):
    cache = new_cache(net, slots=2, capacity=16)
    feed(net, cache, tokens(5, 0))
    before = (list(cache.lengths), list(cache._next), cache.valid.clone())
    for call, message in [
        (lambda: cache.truncate(2, 0), r"slot must be a slot index in \[0, 2\), got 2"),
        (lambda: cache.truncate(-1, 0), r"slot must be a slot index in \[0, 2\), got -1"),
        (lambda: cache.truncate(0, 6), r"n must be a number of positions in \[0, 5\] \(KV cache slot 0 holds "
                                       r"positions up to 4\), got 6"),
        (lambda: cache.truncate(0, -1), r"in \[0, 5\] .*got -1"),
        (lambda: cache.truncate(0, True), r"in \[0, 5\] .*got True"),
        (lambda: cache.truncate(0, 2.0), r"in \[0, 5\] .*got 2\.0"),
        (lambda: cache.truncate(1, 1), r"in \[0, 0\] \(KV cache slot 1 is empty\), got 1"),
        (lambda: cache.copy_prefix(0, 0, 2), "copy_prefix needs two different slots, got src = dst = 0"),
        (lambda: cache.copy_prefix(0, 2, 2), r"dst must be a slot index in \[0, 2\), got 2"),
        (lambda: cache.copy_prefix(3, 1, 2), r"src must be a slot index in \[0, 2\), got 3"),
        (lambda: cache.copy_prefix(1, 0, 1), r"KV cache slot 1 is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    assert (cache.lengths, cache._next) == tuple(before[:2]) and torch.equal(cache.valid, before[2])


def test_a_slot_whose_positions_go_back_is_not_truncated(net):
    cache = new_cache(net)
    with torch.no_grad():
        net(tokens(3, 0), torch.tensor([[10, 11, 12]]), cache=cache)
        net(tokens(2, 1), torch.tensor([[0, 1]]), cache=cache)
    with pytest.raises(ValueError, match="KV cache slot 0: its positions do not increase along its entries, so "
                                         "those before 1 are no prefix of them"):
        cache.truncate(0, 1)

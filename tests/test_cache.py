"""The per-slot KV cache: sequences admitted at different times, sitting at different lengths in
one batch, decode exactly what each gives alone; slots are freed and reused; bad calls are named."""

from __future__ import annotations

import pytest
import torch

from andromeda import KVCache
from andromeda.inference.generate import generate
from helpers import FEATURES, random_net


def greedy_alone(net, prompt: torch.Tensor, new: int) -> list[int]:
    return generate(net, prompt.to(net.token_emb.weight.device), new, temperature=0)[0].tolist()


class Scheduler:
    """A minimal continuous-batching loop over the raw model API: requests due at a step are
    admitted into free slots (one prefill each), then one batched call decodes a token for every
    running request over its slot; a finished request frees its slot at once."""

    def __init__(self, net, slots: int, capacity: int) -> None:
        self.net = net
        self.device = net.token_emb.weight.device
        self.cache = KVCache(net.config, slots, capacity, dtype=torch.float32, device=self.device)
        self.free = list(range(slots))
        self.running: dict[int, dict] = {}  # slot -> {name, out, left, position}
        self.outputs: dict[str, list[int]] = {}

    @torch.no_grad()
    def admit(self, name: str, prompt: torch.Tensor, new: int) -> None:
        slot = self.free.pop(0)
        self.cache.reset([slot])
        logits = self.net(prompt[None].to(self.device), cache=self.cache, slots=[slot], logits_to_keep=1)[:, -1]
        self.running[slot] = dict(name=name, out=[int(logits.argmax(-1))], left=new - 1, position=len(prompt))
        self._retire()

    @torch.no_grad()
    def step(self) -> None:
        slots = sorted(self.running)
        if slots:
            tokens = torch.tensor([[self.running[s]["out"][-1]] for s in slots], device=self.device)  # (B, 1)
            positions = torch.tensor([[self.running[s]["position"]] for s in slots], device=self.device)  # (B, 1)
            logits = self.net(tokens, positions, cache=self.cache, slots=slots, logits_to_keep=1)[:, -1]
            for slot, token in zip(slots, logits.argmax(-1).tolist()):
                request = self.running[slot]
                request["out"].append(token)
                request["left"] -= 1
                request["position"] += 1
        self._retire()

    def _retire(self) -> None:
        for slot in [s for s, r in self.running.items() if r["left"] == 0]:
            request = self.running.pop(slot)
            self.outputs[request["name"]] = request["out"]
            self.free.append(slot)


def run_schedule(net, arrivals: dict[int, list], slots: int, capacity: int) -> dict[str, list[int]]:
    """arrivals: {step: [(name, prompt, new tokens)]}; returns each request's tokens."""
    scheduler = Scheduler(net, slots, capacity)
    expected = sum(len(requests) for requests in arrivals.values())
    for step in range(100):
        for name, prompt, new in arrivals.get(step, []):
            scheduler.admit(name, prompt, new)
        scheduler.step()
        if len(scheduler.outputs) == expected:
            return scheduler.outputs
    raise AssertionError(f"the schedule did not finish: {scheduler.outputs}")


@pytest.mark.parametrize("overrides", FEATURES.values(), ids=FEATURES.keys())
def test_rows_admitted_at_different_times_decode_as_if_alone(overrides, device):
    net = random_net(**overrides).to(device)
    g = torch.Generator().manual_seed(4)
    prompt = lambda n: torch.randint(0, 258, (n,), generator=g)  # noqa: E731
    # Four requests over three slots: b and c join a running a; d reuses a's slot once a ends,
    # so one batch holds rows at different lengths, in non-consecutive slots, and a reused slot.
    arrivals = {0: [("a", prompt(5), 6)], 2: [("b", prompt(9), 10)], 3: [("c", prompt(3), 12)],
                7: [("d", prompt(7), 8)]}
    outputs = run_schedule(net, arrivals, slots=3, capacity=32)
    for requests in arrivals.values():
        for name, p, new in requests:
            assert outputs[name] == greedy_alone(net, p, new), name
    assert len(set(map(tuple, outputs.values()))) == 4, "distinct requests should give distinct outputs"


def test_slots_read_only_their_own_entries_after_reuse():
    """A reused slot must not see its previous occupant's keys, even beyond the new length."""
    net = random_net()
    cache = KVCache(net.config, 2, 24, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        net(torch.randint(0, 258, (1, 20)), cache=cache, slots=[1])
        cache.reset([1])
        short = torch.randint(0, 258, (1, 4))
        reused = net(short, cache=cache, slots=[1])
        fresh = net(short)
    torch.testing.assert_close(reused, fresh, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [0, 4]


def test_a_chunked_prefill_equals_one_prefill():
    net = random_net()
    prompt = torch.randint(0, 258, (1, 30), generator=torch.Generator().manual_seed(0))
    whole = KVCache(net.config, 1, 40, dtype=torch.float32, device="cpu")
    chunked = KVCache(net.config, 1, 40, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        expected = net(prompt, cache=whole)[:, -1]
        for start in range(0, 30, 8):
            last = net(prompt[:, start : start + 8], cache=chunked)[:, -1]
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.k, whole.k, atol=1e-6, rtol=1e-5)


def test_bad_cache_calls_are_named():
    net = random_net()
    cache = KVCache(net.config, 2, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="KV cache slot 0 holds 0 positions; 9 more exceed its capacity 8"):
        net(torch.zeros(1, 9, dtype=torch.long), cache=cache, slots=[0])
    with pytest.raises(ValueError, match=r"slots must be distinct indices in \[0, 2\), got \[1, 1\]"):
        net(torch.zeros(2, 1, dtype=torch.long), cache=cache, slots=[1, 1])
    with pytest.raises(ValueError, match=r"slots must be distinct indices in \[0, 2\), got \[2\]"):
        net(torch.zeros(1, 1, dtype=torch.long), cache=cache, slots=[2])
    with pytest.raises(ValueError, match="at least one slot"):
        KVCache(net.config, 0, 8, dtype=torch.float32, device="cpu")

"""Long context: xPos stays finite and exact at any length, models without learned absolute
positions read past max_seq_len, sliding-window generation (ring-buffer KV cache with attention
sinks) equals its specification and runs in flat memory, and `andromeda eval` plots several
checkpoints against the evaluation length.

The specification for attention is `exact_logits`: a float64 forward written from the papers,
in which the xPos factor of a query i and a key j is zeta^((i - j) / base) itself, never split
into a query part and a key part, so nothing in it can overflow.
"""

from __future__ import annotations

import json
import logging
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from andromeda import Andromeda, cli
from andromeda.checkpoint import finish_checkpoint_folder, write_checkpoint_files
from andromeda.data import TokenStore
from andromeda.evaluation import evaluate
from andromeda.inference.generate import decode_one, generate, generation_cache, prefill, stream
from andromeda.model import KVCache
from andromeda.model import attention as attention_module
from andromeda.model import transformer as transformer_module
from andromeda.model.positions import XPOS_GAMMA, xpos_blocks, xpos_max_factor, xpos_reach
from andromeda.tokenizers import ByteTokenizer
from helpers import FEATURES, assert_loss_plot, random_net

# xPos with scale base 8 instead of 512: one center stops covering the positions after 377 of
# them instead of 24,173, so every long-context path runs at test sizes.
SHORT_XPOS = dict(xpos_scale_base=8.0)
RELATIVE = {name: o for name, o in FEATURES.items() if not o.get("use_abs_pos_emb")}


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 258, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_center(monkeypatch):
    """The factorisation before this fix: one center per sequence, factors unbounded."""
    monkeypatch.setattr(transformer_module, "xpos_reach", lambda *args, **kwargs: 10**9)
    monkeypatch.setattr(transformer_module, "xpos_max_factor", lambda *args, **kwargs: math.inf)


# ----------------------------------------------------------------------------- xPos at any length


def test_xpos_limits_follow_the_dtype():
    # e^29.6: the cube root of fp32's (and bf16's) largest number; fp16 gets 40.
    assert math.log(xpos_max_factor(torch.float32)) == pytest.approx(29.57, abs=0.01)
    assert math.log(xpos_max_factor(torch.bfloat16)) == pytest.approx(29.57, abs=0.01)
    assert xpos_max_factor(torch.float16) == pytest.approx(40.3, abs=0.1)
    # zeta = 0.4/1.4 decays fastest: the reach is the last position where zeta^-(reach / base)
    # is within the max factor (one position more is 1.0025 times as much)
    zeta = XPOS_GAMMA / (1 + XPOS_GAMMA)
    assert 1 <= zeta ** (xpos_reach(512.0) / 512) * xpos_max_factor() < zeta ** (-1 / 512)
    assert xpos_reach(512.0) == 12086 and xpos_reach(8.0) == 188 and xpos_reach(512.0, torch.float16) == 1510


def test_blocks_split_where_positions_jump():
    positions = torch.cat((torch.arange(4), 1000 + torch.arange(300)))[None]  # sinks, then a jump
    blocks = xpos_blocks(positions, rows=128, reach=100)
    assert blocks == [(0, 4), (4, 132), (132, 260), (260, 304)]
    spans = [int(positions[0, end - 1] - positions[0, start]) for start, end in blocks]
    assert max(spans) <= 200
    # every row of a batch must fit: the second row's positions run twice as fast
    batch = torch.stack((torch.arange(300), 2 * torch.arange(300)))
    assert xpos_blocks(batch, rows=512, reach=100) == [(0, 101), (101, 202), (202, 300)]


def test_one_center_overflows_where_blocks_stay_exact(one_center, monkeypatch):
    net = random_net(**SHORT_XPOS).eval()
    x = tokens(1, 2048)
    with torch.no_grad():
        naive = net(x)
        monkeypatch.undo()
        ours = net(x)
    assert not torch.isfinite(naive).all(), "the test must reach the overflow of one center"
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), exact_logits(net, x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["seed", "xpos_only", "reference_attention", "multi_query", "no_qk_norm"])
def test_long_sequences_equal_the_exact_computation(name, one_center, monkeypatch):
    """Past one center's reach (in blocks): equal to the exact computation, and to one center
    where that one is still finite (the fused kernels never score the masked far pairs)."""
    net = random_net(**SHORT_XPOS, **FEATURES[name]).eval()
    x = tokens(2, 1024)
    with torch.no_grad():
        naive = net(x)  # finite at this length on every path, but for reading: factors of e^80
        monkeypatch.undo()
        ours = net(x)
    torch.testing.assert_close(ours.double(), exact_logits(net, x), atol=2e-5, rtol=0)
    if name == "reference_attention":  # scores every pair, masked ones too: e^80 * e^80 overflows
        assert not torch.isfinite(naive).all()
    else:
        torch.testing.assert_close(ours, naive, atol=2e-5, rtol=0)


def test_positions_with_a_jump_equal_the_exact_computation():
    """Sinks at 0..3 and the rest 5000 positions later (what recomputing a window reads)."""
    net = random_net(**SHORT_XPOS).eval()
    positions = torch.cat((torch.arange(4), 5000 + torch.arange(396)))[None].repeat(2, 1)
    x = tokens(2, 400)
    with torch.no_grad():
        ours = net(x, positions)
    torch.testing.assert_close(ours.double(), exact_logits(net, x, positions), atol=2e-5, rtol=0)


def test_a_block_of_one_query_equals_the_exact_computation(monkeypatch):
    """A jump before the last position leaves that query alone in its xPos block: its 4 query
    heads run as 4 query rows of each of the 2 key/value heads (`attention._sdpa`)."""
    net = random_net(**SHORT_XPOS).eval()
    seen = []
    grouped = attention_module._sdpa

    def spy(q, k, v, mask, scale):
        seen.append((q.shape[1], q.shape[2], k.shape[1]))
        return grouped(q, k, v, mask, scale)

    monkeypatch.setattr(attention_module, "_sdpa", spy)
    positions = torch.cat((torch.arange(63), torch.tensor([700])))[None].repeat(2, 1)
    x = tokens(2, 64)
    with torch.no_grad():
        ours = net(x, positions)
    H, K = net.config.heads, net.config.attn_kv_heads
    assert H > K and (H, 1, K) in seen  # the one-row block took the grouped path
    torch.testing.assert_close(ours.double(), exact_logits(net, x, positions), atol=2e-5, rtol=0)


def test_bf16_long_sequences_stay_close_to_the_exact_computation():
    net = random_net(**SHORT_XPOS).eval()
    x = tokens(1, 2048)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = net(x).float()
    assert torch.isfinite(ours).all()
    error = (ours.double() - exact_logits(net, x)).abs().max().item()
    assert error < 0.05, error  # bf16 rounding; logits reach about 2.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_preset_reads_32k_positions(dtype):
    """The tiny preset at 32,768 positions (32x its max_seq_len, 2.7x one xPos center's reach
    with base 512): finite logits, a proper distribution at every position."""
    torch.manual_seed(0)
    net = Andromeda.from_config("tiny").Andromeda.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = net(tokens(1, 32768))
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    probs = logits[0].float().softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(32768))


def test_tiny_preset_at_32k_positions_is_exact():
    """One layer, so the exact computation of the last positions reads only the embeddings:
    cheap at 32k. (With two layers, one center is 7e-3 off the exact logits there, the blocks
    1.2e-6: benchmarks are not tests; measured once with this function in float64.)"""
    torch.manual_seed(0)
    net = Andromeda.from_config("tiny", depth=1).Andromeda.eval()
    x = tokens(1, 32768)
    with torch.no_grad():
        ours = net(x)[:, -128:]
    torch.testing.assert_close(ours.double(), exact_logits(net, x, last=128), atol=2e-5, rtol=0)


def test_cached_decoding_moves_the_center_and_stays_exact():
    """A KV cache slot whose positions run past its center's reach: the center moves (the keys
    rescaled once), and every step still equals the exact computation."""
    net = random_net(**SHORT_XPOS).eval()
    x = tokens(1, 900)
    cache = KVCache(net.config, 1, 900, dtype=torch.float32, device="cpu")
    steps = []
    with torch.no_grad():
        steps.append(net(x[:, :300], cache=cache))
        centers = [cache._centers[0]]
        for start in range(300, 900, 100):  # chunks of 100, then single tokens
            steps.append(net(x[:, start : start + 100], cache=cache))
            centers.append(cache._centers[0])
    assert len(set(centers)) >= 3, f"the center should have moved: {centers}"
    assert torch.isfinite(cache.k).all()
    torch.testing.assert_close(torch.cat(steps, dim=1).double(), exact_logits(net, x), atol=2e-5, rtol=0)


def test_a_cached_call_spanning_more_than_one_center_is_refused():
    net = random_net(**SHORT_XPOS)
    cache = KVCache(net.config, 1, 1000, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"positions 0\.\.399 span 400, more than the 377 that fit around one "
                                         r"xPos center in torch.float32; feed them in chunks of at most 377"):
        net(tokens(1, 400), cache=cache)
    assert cache.max_new_positions == 377


def test_generation_prefills_a_prompt_longer_than_one_center_in_chunks():
    net = random_net(**SHORT_XPOS, depth=1)
    prompt = tokens(1, 1000)
    assert torch.equal(generate(net, prompt, 8, temperature=0), generate(net, prompt, 8, temperature=0,
                                                                          cache_kv=False))


# ----------------------------------------------------------------------------- past max_seq_len


def test_relative_positions_read_past_max_seq_len_and_say_so_once(caplog, tmp_path):
    torch.manual_seed(0)
    model = Andromeda.from_config("tiny", max_seq_len=32)
    with caplog.at_level(logging.INFO, logger="andromeda"):
        assert model.Andromeda(tokens(1, 100)).shape == (1, 100, 258)
        loss = model(tokens(2, 129))  # the wrapper's loss: 128 inputs
        assert torch.isfinite(loss)
        path = tmp_path / "text.txt"
        path.write_text("to be or not to be " * 40)
        store = TokenStore([path], ByteTokenizer(), cache_dir=tmp_path / "cache")
        result = evaluate(model.Andromeda, store.tokens, 256, 2, store.num_bytes)
    assert result["tokens"] == len(store) - 1 and math.isfinite(result["bits_per_byte"])
    said = [r.getMessage() for r in caplog.records if "extrapolating" in r.getMessage()]
    assert said == ["extrapolating past max_seq_len=32: 100 positions"]


def test_learned_absolute_positions_keep_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = Andromeda.from_config("tiny", max_seq_len=32, use_abs_pos_emb=True)
    model.Andromeda(tokens(1, 32))
    with pytest.raises(ValueError, match=r"sequence length 33 exceeds the limit 32 \(max_seq_len=32, where the "
                                         r"learned absolute positions end\)"):
        model.Andromeda(tokens(1, 33))
    with pytest.raises(ValueError, match="sequence length 34 exceeds the limit 33"):
        model(tokens(1, 34))
    path = tmp_path / "text.txt"
    path.write_text("to be or not to be " * 10)
    store = TokenStore([path], ByteTokenizer(), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="evaluation seq_len 33 exceeds the model's max_seq_len 32, where its "
                                         "learned absolute positions end"):
        evaluate(model.Andromeda, store.tokens, 33, 2, store.num_bytes)
    with pytest.raises(ValueError, match=r"prompt length 20 \+ seq_len 13 = 33 exceeds max_seq_len=32, where this "
                                         r"model's learned absolute positions end"):
        generate(model.Andromeda, tokens(1, 20), 13, window=16)
    within = generate(model.Andromeda, tokens(1, 20), 12, temperature=0)  # 32 positions: all learned
    assert torch.equal(generate(model.Andromeda, tokens(1, 20), 12, temperature=0, window=32), within)
    assert generate(model.Andromeda, tokens(1, 20), 12, window=8, sink_tokens=2).shape == (1, 12)


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("overrides", FEATURES.values(), ids=FEATURES.keys())
def test_within_the_window_sliding_generation_is_normal_generation(overrides, sinks):
    net = random_net(**overrides)
    prompts = tokens(2, 12, seed=1)
    normal = generate(net, prompts, 24, temperature=0)
    assert torch.equal(generate(net, prompts, 24, temperature=0, window=36, sink_tokens=sinks), normal)
    assert len(normal.unique()) >= 4


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("overrides", RELATIVE.values(), ids=RELATIVE.keys())
def test_one_layer_past_the_window_equals_recomputing_the_window(overrides, sinks):
    """With one layer a cached key depends only on its token and position, so the ring buffer
    must give exactly what the model gives on the sinks and the last window - sinks tokens,
    recomputed at their absolute positions."""
    net = random_net(depth=1, max_seq_len=16, **overrides).eval()
    prompt, new, window = tokens(1, 10, seed=2), 70, 16
    cache = generation_cache(net, 1, 10, new, window, sinks)
    sequence = prompt[0].tolist()
    with torch.no_grad():
        logits = prefill(net, prompt, torch.arange(10)[None], None, cache)
        for _ in range(new):
            n = len(sequence)
            kept = list(range(sinks)) + list(range(max(sinks, n - window + sinks), n))
            expected = net(torch.tensor([sequence])[:, kept], torch.tensor([kept]))[:, -1]
            torch.testing.assert_close(logits, expected, atol=2e-5, rtol=0)
            sequence.append(int(logits.argmax(-1)))
            logits = decode_one(net, torch.tensor([[sequence[-1]]]), None, cache)
    assert cache.k.shape[3] == window + 10 - 1 + 1  # window, one prefill pass, the padding column
    # generate() does the same, and its recomputing path is that recomputation
    cached = generate(net, prompt, new, temperature=0, window=window, sink_tokens=sinks)
    assert cached[0].tolist() == sequence[10:]
    assert torch.equal(generate(net, prompt, new, temperature=0, window=window, sink_tokens=sinks,
                                cache_kv=False), cached)


@pytest.mark.parametrize("overrides", [{}, SHORT_XPOS, FEATURES["xpos_only"], FEATURES["alibi_all_heads"]],
                         ids=["seed", "short_xpos", "xpos_only", "alibi_all_heads"])
def test_deep_models_past_the_window_equal_sliding_window_attention(overrides):
    """Deeper layers' cached keys carry the context they were computed with (StreamingLLM), so
    the specification is sliding-window attention over the whole sequence: each query reads the
    sinks and the last window - sinks keys, at every layer. 460 positions: the short-xPos
    model's cache moves its center on the way."""
    net = random_net(max_seq_len=32, **overrides).eval()
    prompt, new, window, sinks = tokens(1, 40, seed=3), 420, 24, 4
    cache = generation_cache(net, 1, 40, new, window, sinks)
    steps, sequence = [], prompt[0].tolist()
    with torch.no_grad():
        logits = prefill(net, prompt, torch.arange(40)[None], None, cache)
        for _ in range(new):
            steps.append(logits)
            sequence.append(int(logits.argmax(-1)))
            logits = decode_one(net, torch.tensor([[sequence[-1]]]), None, cache)
    exact = exact_logits(net, torch.tensor([sequence[:-1]]), window=window, sinks=sinks)[0, 39:]
    torch.testing.assert_close(torch.cat(steps).double(), exact, atol=2e-5, rtol=0)
    assert len(set(sequence[40:])) >= 4


def test_ragged_prompts_slide_as_if_alone():
    net = random_net(max_seq_len=24)
    rows = [tokens(1, n, seed=n)[0] for n in (3, 17, 9)]
    batch = generate(net, rows, 60, temperature=0, sink_tokens=2)  # past max_seq_len: window 24
    for i, row in enumerate(rows):
        assert torch.equal(batch[i], generate(net, row, 60, temperature=0, sink_tokens=2)[0]), f"row {i}"
    assert torch.equal(generate(net, rows, 60, temperature=0, sink_tokens=2, cache_kv=False)[0],
                       generate(net, rows[0], 60, temperature=0, sink_tokens=2, cache_kv=False)[0])


def test_a_long_prompt_slides_through_the_window_in_passes():
    """A prompt four windows long: prefilled pass by pass into the ring buffer."""
    net = random_net(depth=1, max_seq_len=16)
    prompt = tokens(1, 64, seed=5)
    cached = generate(net, prompt, 10, temperature=0, sink_tokens=2)
    assert torch.equal(cached, generate(net, prompt, 10, temperature=0, sink_tokens=2, cache_kv=False))


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode and still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)


def test_memory_stays_flat_over_ten_times_max_seq_len():
    torch.manual_seed(0)
    net = Andromeda.from_config("tiny", max_seq_len=64).Andromeda.eval()
    caches = []
    hook = net.register_forward_pre_hook(lambda m, a, kw: caches.append(kw.get("cache")), with_kwargs=True)
    peaks = {}
    try:
        net(tokens(1, 4))  # the first forward caches its ALiBi slopes: not generation's memory
        for new in (64, 640):
            caches.clear()
            with LiveTensorBytes() as memory:
                for _ in stream(net, tokens(1, 8), new, temperature=0, sink_tokens=4):
                    pass
            peaks[new] = memory.peak
            assert len({id(c) for c in caches}) == 1 and len({c.k.data_ptr() for c in caches}) == 1
    finally:
        hook.remove()
    cache = caches[0]
    assert cache.k.shape[3] == 64 + 8 - 1 + 1 and cache.lengths == [8 + 639]
    cache_bytes = sum(t.nbytes for t in (cache.k, cache.v, cache.positions, cache.valid))
    assert peaks[640] == peaks[64], peaks  # 10x the tokens, not one byte more
    assert peaks[640] < 2 * cache_bytes + 40_000, (peaks, cache_bytes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=-1), "window must be a positive number of tokens, got -1"),
    (dict(window=0), "window must be a positive number of tokens, got 0"),
    (dict(window=4, sink_tokens=4), "window 4 must be at least sink_tokens \\+ 1 = 5: it holds the 4 sink tokens "
                                    "plus at least one recent token"),
    (dict(window=8, sink_tokens=-1), "sink_tokens must be an integer >= 0, got -1"),
    (dict(sink_tokens=-2), "sink_tokens must be an integer >= 0, got -2"),
    (dict(window=True), "window must be a positive number of tokens, got True"),
])
def test_bad_windows_are_named(kwargs, message):
    net = random_net()
    with pytest.raises(ValueError, match=message):
        generate(net, tokens(1, 4), 4, **kwargs)
    with pytest.raises(ValueError, match=message):
        stream(net, tokens(1, 4), 4, **kwargs)


def test_bad_cache_windows_are_named():
    config = random_net().config
    make = lambda **kw: KVCache(config, 1, 8, dtype=torch.float32, device="cpu", **kw)  # noqa: E731
    with pytest.raises(ValueError, match="sink_tokens=2 needs a sliding window; give window too"):
        make(sink_tokens=2)
    with pytest.raises(ValueError, match="needs capacity >= window, got capacity=8, window=9"):
        make(window=9)
    with pytest.raises(ValueError, match="window must be a positive number of tokens, got -3"):
        make(window=-3)
    cache = make(window=6, sink_tokens=1)
    with pytest.raises(ValueError, match=r"positions 0\.\.3 span 4, more than the 3 that fit beside a full window "
                                         r"of 6"):
        random_net()(tokens(1, 4), cache=cache)


# ----------------------------------------------------------------------------- the command line


def _checkpoint(tmp_path, name: str, seed: int, train_seq_len: int | None, **overrides):
    torch.manual_seed(seed)
    net = Andromeda.from_config("tiny", max_seq_len=32, **overrides).Andromeda
    folder = tmp_path / name / "checkpoints" / "step_000001"
    folder.mkdir(parents=True)
    train_config = {"seq_len": train_seq_len} if train_seq_len else None
    write_checkpoint_files(folder, net.config, net.state_dict(), ByteTokenizer(), train_config)
    finish_checkpoint_folder(folder)
    return folder


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("Out, out, brief candle! Life's but a walking shadow. " * 20)
    return path


def test_eval_compares_checkpoints_by_length_and_plots_them(tmp_path, text, capsys):
    a, b = _checkpoint(tmp_path, "short", 0, 16), _checkpoint(tmp_path, "long", 1, 32)
    common = ["--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--batch-size", "4"]
    plot = tmp_path / "lengths.png"
    assert cli.main(["eval", "--checkpoint", str(a), str(b), "--seq-len", "16", "64", "256", "--plot", str(plot),
                     "--json", *common]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [r["checkpoint"] for r in both["checkpoints"]] == [str(a), str(b)]
    assert [r["train_seq_len"] for r in both["checkpoints"]] == [16, 32]
    for report in both["checkpoints"]:
        assert list(report["results"]) == ["16", "64", "256"] and report["seq_len"] == 16
        assert all(math.isfinite(r["bits_per_byte"]) for r in report["results"].values())
    assert_loss_plot(plot)
    # one checkpoint: the object as before, no train_seq_len
    assert cli.main(["eval", "--checkpoint", str(a), "--seq-len", "16", "64", "256", "--json", *common]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one == {k: v for k, v in both["checkpoints"][0].items() if k != "train_seq_len"}
    assert cli.main(["eval", "--checkpoint", str(a), *common]) == 0  # default: the training length
    out = capsys.readouterr().out
    assert "trained at 16 tokens" in out and "\n      16 " in out


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "64"], "--seq-len 64 is outside 1..32 (the model's max_seq_len); "),
    (["--seq-len", "0"], "--seq-len 0 must be a positive number of tokens"),
    (["--plot", "missing/plot.png"], "plot folder missing does not exist (for --plot missing/plot.png)"),
    (["--plot", "plot.txt"], "plot file plot.txt must end in one of .png, .svg, .pdf"),
])
def test_eval_bad_input_is_named(tmp_path, text, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    folder = _checkpoint(tmp_path, "absolute", 0, 16, use_abs_pos_emb=True)
    assert cli.main(["eval", "--checkpoint", str(folder), "--data", str(text), "--cache-dir", str(tmp_path / "c"),
                     "--device", "cpu", *args]) == 1
    assert f"andromeda eval: error: {message}" in capsys.readouterr().err


def test_generate_slides_past_max_seq_len_from_the_command_line(tmp_path, capsys):
    folder = _checkpoint(tmp_path, "run", 0, 16)
    args = ["generate", "--checkpoint", str(folder), "--prompt", "ROMEO:", "--max-new-tokens", "100",
            "--temperature", "0", "--device", "cpu"]
    assert cli.main([*args, "--window", "16", "--sink-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert cli.main([*args, "--window", "4", "--sink-tokens", "4"]) == 1
    assert "andromeda generate: error: window 4 must be at least sink_tokens + 1 = 5" in capsys.readouterr().err
    assert cli.main([*args, "--window", "-1"]) == 1
    assert "andromeda generate: error: window must be a positive number of tokens, got -1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the specification


def exact_logits(net, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                 window: int | None = None, sinks: int = 0, last: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) in float64, computed as the papers write the model: rotary pairs
    rotated by position, the xPos factor zeta^((i - j) / base) applied to each pair's product
    directly (Sun et al. 2022, eq. 7), ALiBi as -slope * |i - j|, the causal mask, and with a
    window each query reading only the sinks and the last window - sinks positions. Uses the
    net's weights and nothing of its attention code. `last`: only the last positions' logits
    (B, last, V), the final layer's attention computed for those rows alone."""
    config = net.config
    f64 = torch.float64
    weights = {name: w.detach().to(f64) for name, w in net.state_dict().items()}
    B, T = tokens.shape
    pos = torch.arange(T).expand(B, T) if positions is None else positions
    H, K, D, R = config.heads, config.attn_kv_heads, config.dim_head, config.rotary_dim
    pairs = torch.arange(0, R, 2, dtype=f64)
    inv_freq = config.rotary_base ** (-pairs / R)
    zeta = (pairs + XPOS_GAMMA * R) / ((1 + XPOS_GAMMA) * R)
    slopes = torch.tensor(net._slopes, dtype=f64) if net._slopes is not None else None
    norm = lambda x, name: F.layer_norm(x, (config.dim,), weights[name], None, config.norm_eps)  # noqa: E731
    x = weights["token_emb.weight"][tokens]
    for layer, block in enumerate(net.blocks):
        p = f"blocks.{layer}."
        qkv = (norm(x, p + "attn_norm.weight") @ weights[p + "attn.to_qkv.weight"].T).view(B, T, H + 2 * K, D)
        q, k, v = qkv.transpose(1, 2).split((H, K, K), dim=1)
        if block.attn.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            if block.attn.q_scale is not None:
                q, k = q * weights[p + "attn.q_scale"], k * weights[p + "attn.k_scale"]
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # head h reads h // G
        if config.rotary_xpos:
            turn = torch.polar(torch.ones(B, 1, T, R // 2, dtype=f64), pos[:, None, :, None].to(f64) * inv_freq)
            q_pairs = torch.view_as_complex(q[..., :R].reshape(B, H, T, R // 2, 2).contiguous()) * turn
            k_pairs = torch.view_as_complex(k[..., :R].reshape(B, H, T, R // 2, 2).contiguous()) * turn
        first = T - last if last is not None and layer == len(net.blocks) - 1 else 0
        if first:
            x = x[:, first:]
        attention = torch.empty(B, H, T - first, T, dtype=f64)
        for rows in (slice(start, start + 128) for start in range(first, T, 128)):
            d = pos[:, rows, None] - pos[:, None, :]  # (B, rows, T) i - j
            allowed = (torch.arange(T)[None, None, :] <= torch.arange(T)[None, rows, None]) & (d >= 0)
            if window is not None:
                allowed = allowed & ((pos[:, None, :] < sinks) | (d < window - sinks))
            if config.rotary_xpos:
                products = (q_pairs[:, :, rows, None] * k_pairs[:, :, None].conj()).real  # (B, H, rows, T, R/2)
                decay = zeta ** (d.clamp(min=0).to(f64)[:, None, :, :, None] / config.xpos_scale_base)
                scores = (products * decay).sum(-1) + q[:, :, rows, R:] @ k[..., R:].transpose(-1, -2)
            else:
                scores = q[:, :, rows] @ k.transpose(-1, -2)
            scores = scores * block.attn.logit_scale
            if slopes is not None:
                scores = scores - slopes[None, :, None, None] * d.abs().to(f64)[:, None]
            out_rows = slice(rows.start - first, rows.stop - first)
            attention[:, :, out_rows] = scores.masked_fill(~allowed[:, None], -math.inf).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(B, T - first, H * D)
        x = x + out @ weights[p + "attn.to_out.weight"].T
        hidden = norm(x, p + "ff_norm.weight") @ weights[p + "ff.proj_in.weight"].T + weights[p + "ff.proj_in.bias"]
        hidden = F.gelu(hidden)
        x = x + hidden @ weights[p + "ff.proj_out.weight"].T + weights[p + "ff.proj_out.bias"]
    return norm(x, "final_norm.weight") @ weights["to_logits.weight"].T

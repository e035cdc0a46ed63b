"""The int8 KV cache (`kv_dtype="int8"`): decoding close to a full-precision cache, the state API
(truncate, copy_prefix) exact against recomputation, ring buffers, xPos far from the center,
evaluation through it, and bad names refused.

Tolerance. Each stored key and value row is off by at most half a step, absmax / 254, of its own
head's largest entry: relative errors of ~0.4% per row, which attention averages and the layers
pass on. On the tiny model (weights scaled 3x, logits up to ~2) that moves logits by 0.002 to
0.014; LOGITS allows 0.05. The bound matters: storing xPos-scaled keys per token (the design this
cache avoids, module docstring of `model.cache`) moves them by ~0.2 and flips greedy tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from andromeda import Config, KVCache
from andromeda.checkpoint import save_pretrained
from andromeda.cli import main
from andromeda.cli.eval import KV_CACHE_DTYPES as CLI_KV_CACHE_DTYPES
from andromeda.evaluation import evaluate
from andromeda.inference import kv_attention
from andromeda.inference.generate import decode_one, generate, generation_cache, prefill, prompt_positions
from andromeda.model.cache import KV_CACHE_DTYPES
from andromeda.tokenizers import ByteTokenizer
from helpers import random_net

VOCAB = 258
LOGITS = dict(atol=0.05, rtol=0)
EXACT = dict(atol=1e-5, rtol=1e-5)
# xPos with scale base 8: one center covers 188 positions either side, so a few hundred tokens
# move it (as ~24,000 do at base 512), and keys sit up to e^29.6 apart in scale around it.
SHORT_XPOS = dict(xpos_scale_base=8.0)


@pytest.fixture(scope="module")
def net():
    return random_net().eval()


def tokens(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def new_cache(net, kv_dtype: str, slots: int = 1, capacity: int = 64, **ring) -> KVCache:
    return KVCache(net.config, slots, capacity, dtype=torch.float32, device="cpu", kv_dtype=kv_dtype, **ring)


@torch.no_grad()
def feed(net, cache: KVCache, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """Logits (1, T, V) of feeding x into `slot`, in chunks the cache takes in one call."""
    chunk = cache.max_new_positions
    return torch.cat([net(x[:, i : i + chunk], cache=cache, slots=[slot]) for i in range(0, x.shape[1], chunk)], 1)


@torch.no_grad()
def decode(net, cache: KVCache, prompt: torch.Tensor, steps: int, forced: torch.Tensor | None = None):
    """Greedy tokens (B, steps) and every step's logits (B, steps, V), through `prefill` and
    `decode_one`; with `forced` (B, steps), those tokens are fed instead of the greedy ones."""
    B, N = prompt.shape
    logits = prefill(net, prompt, torch.arange(N).expand(B, N), None, cache)
    chosen, seen = [], []
    for step in range(steps):
        seen.append(logits)
        chosen.append(logits.argmax(-1))
        fed = chosen[-1] if forced is None else forced[:, step]
        logits = decode_one(net, fed[:, None], None, cache)
    return torch.stack(chosen, 1), torch.stack(seen, 1)


def test_int8_cache_decodes_like_the_full_precision_cache(net):
    prompt = tokens(24, seed=1, rows=2)
    int8 = new_cache(net, "int8", slots=2)
    tokens_fp32, logits_fp32 = decode(net, new_cache(net, "auto", slots=2), prompt, 32)
    # A short greedy run agrees; later, the random model meets near-ties (top-2 margins of 0.001).
    assert torch.equal(decode(net, int8, prompt, 12)[0], tokens_fp32[:, :12])
    # Fed the same tokens, every step's logits stay close.
    int8.reset()
    _, logits_int8 = decode(net, int8, prompt, 32, forced=tokens_fp32)
    assert int8.k.dtype == int8.v.dtype == torch.int8
    torch.testing.assert_close(logits_int8, logits_fp32, **LOGITS)
    assert not torch.allclose(logits_int8, logits_fp32, **EXACT)  # it did quantize
    # Keys and values of one position: per head D int8 and one fp32 scale, against D fp32.
    config = net.config
    assert int8.bytes_per_token == config.depth * config.attn_kv_heads * 2 * (config.dim_head + 4)


def test_int8_cache_keeps_xpos_keys_exact_far_from_the_center():
    """Keys up to `reach` from their center and three center moves: within LOGITS of fp32."""
    net = random_net(**SHORT_XPOS).eval()
    x = tokens(600, seed=2)
    int8, fp32 = new_cache(net, "int8", capacity=600), new_cache(net, "auto", capacity=600)
    logits_int8, logits_fp32 = feed(net, int8, x), feed(net, fp32, x)
    assert int8._centers[0] > 2 * int8.reach  # the center moved
    torch.testing.assert_close(logits_int8, logits_fp32, **LOGITS)


@pytest.mark.parametrize("overrides", [{}, SHORT_XPOS], ids=["xpos", "xpos_center_moves"])
def test_truncate_and_copy_prefix_on_int8_equal_recomputation(overrides):
    net = random_net(**overrides).eval()
    prefix, rest, then = tokens(400, seed=3), tokens(30, seed=4), tokens(12, seed=5)
    cache = new_cache(net, "int8", slots=2, capacity=450)
    feed(net, cache, torch.cat((prefix, rest), 1))
    cache.copy_prefix(0, 1, 400)
    cache.truncate(0, 400)
    fresh = new_cache(net, "int8", capacity=450)
    feed(net, fresh, prefix)
    expected = feed(net, fresh, then)
    assert cache.lengths == [400, 400]
    # Without xPos moves the slots hold what recomputation stores, bit for bit; after them the
    # same keys are read around another center (products equal up to rounding).
    for slot in (0, 1):
        torch.testing.assert_close(feed(net, cache, then, slot), expected, **EXACT)


def test_int8_cache_truncates_before_a_moved_center():
    """Stored without xPos factors, int8 keys take any center: the fp32 cache's refusal to move a
    center back (its shrunk keys) does not apply."""
    net = random_net(**SHORT_XPOS).eval()
    x, then = tokens(500, seed=6), tokens(10, seed=7)
    cache = new_cache(net, "int8", capacity=520)
    feed(net, cache, x)
    cut = cache._centers[0] - cache.reach - 50
    cache.truncate(0, cut)
    fresh = new_cache(net, "int8", capacity=520)
    feed(net, fresh, x[:, :cut])
    torch.testing.assert_close(feed(net, cache, then), feed(net, fresh, then), **EXACT)


def test_int8_ring_buffer_wraps_and_rolls_back(net):
    window, sinks = 16, 2
    ring = dict(window=window, sink_tokens=sinks)
    x, then = tokens(70, seed=8), tokens(4, seed=9)
    int8, fp32 = new_cache(net, "int8", capacity=24, **ring), new_cache(net, "auto", capacity=24, **ring)
    torch.testing.assert_close(feed(net, int8, x), feed(net, fp32, x), **LOGITS)  # wrapped ~7 times
    int8.truncate(0, 66)  # a wrapped ring drops its last positions
    fresh = new_cache(net, "int8", capacity=24, **ring)
    feed(net, fresh, x[:, :66])
    torch.testing.assert_close(feed(net, int8, then), feed(net, fresh, then), **EXACT)


def test_evaluation_through_an_int8_cache_costs_little(net):
    text = tokens(4 * 64 + 1, seed=10)[0].numpy().astype(np.int64)
    plain = evaluate(net, text, 64, 4, num_bytes=len(text))
    through = {kv: evaluate(net, text, 64, 4, num_bytes=len(text), kv_cache_dtype=kv) for kv in KV_CACHE_DTYPES}
    assert through["auto"]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert through["int8"]["loss"] == pytest.approx(plain["loss"], rel=5e-3)
    assert through["int8"]["loss"] != pytest.approx(plain["loss"], rel=1e-6)


def test_bad_kv_cache_dtype_is_refused_naming_the_choices(net):
    for bad in ("fp8", "int4", torch.float16):
        with pytest.raises(ValueError, match=r"KV cache dtype must be one of auto, int8 .*got"):
            new_cache(net, bad)
    with pytest.raises(ValueError, match="one of auto, int8"):
        evaluate(net, np.arange(20), 8, 1, num_bytes=20, kv_cache_dtype="float8")
    assert CLI_KV_CACHE_DTYPES == KV_CACHE_DTYPES


def test_eval_command_scores_through_an_int8_cache(net, tmp_path, capsys):
    save_pretrained(net, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    (tmp_path / "held_out.txt").write_text("a held-out text, scored through the cache. " * 8)
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "held_out.txt"), "--device",
            "cpu", "--cache-dir", str(tmp_path / "cache"), "--seq-len", "64", "--json"]
    reports = {}
    for kv in (None, "int8"):
        assert main(args + (["--kv-cache-dtype", kv] if kv else [])) == 0
        reports[kv] = json.loads(capsys.readouterr().out)
    assert reports[None]["kv_cache_dtype"] is None and reports["int8"]["kv_cache_dtype"] == "int8"
    assert reports["int8"]["loss"] == pytest.approx(reports[None]["loss"], rel=5e-3)
    assert reports["int8"]["loss"] != reports[None]["loss"]
    assert main(args + ["--kv-cache-dtype", "fp8"]) == 2
    assert "invalid choice: 'fp8' (choose from 'auto', 'int8')" in capsys.readouterr().err


def test_generate_serve_and_the_cli_decode_through_an_int8_cache(net, tmp_path, capsys):
    """generate(kv_cache_dtype="int8"), the server's engine core and speculative decoding all
    read one int8 cache the same way: the same greedy tokens (per-token scales do not depend on
    how a prompt is chunked or batched)."""
    from andromeda.inference.generate import generate, generation_cache
    from andromeda.inference.sampling import SamplingParams
    from andromeda.inference.speculative import speculative_generate
    from andromeda.serve.config import ServeConfig
    from andromeda.serve.core import EngineCore
    from andromeda.serve.scheduler import Sequence

    assert generation_cache(net, 1, 8, 4, None, kv_dtype="int8").quantized
    prompt = list(range(20, 50))
    ours = generate(net, torch.tensor(prompt), 12, temperature=0, kv_cache_dtype="int8")[0].tolist()
    core = EngineCore(net, ServeConfig(max_batch_size=2, prefill_chunk=8, kv_cache_dtype="int8"))
    assert core.cache.quantized
    seq = Sequence(list(prompt), 12, SamplingParams(0))
    core.add(seq)
    while core.has_work:
        core.step()
    assert seq.output == ours
    assert speculative_generate(net, [prompt], 12, temperature=0, kv_cache_dtype="int8")[0].tolist() == ours
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        generate(net, torch.tensor(prompt), 2, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, int8"):
        ServeConfig(kv_cache_dtype="fp8")
    save_pretrained(net, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--prompt", "Hi",
                 "--max-new-tokens", "5", "--temperature", "0", "--kv-cache-dtype", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


# The decode-attention kernel (`inference.kv_attention`): one new position per row, read straight
# from the int8 entries. Its arithmetic is all float32, so against the dequantize-then-attend path
# (float32 too, for these models) it differs by rounding only.
# Skipped only where it cannot run; a failed build fails these tests.
NO_KERNEL = kv_attention.unavailable_reason()
needs_kernel = pytest.mark.skipif(NO_KERNEL is not None and not NO_KERNEL.startswith("building"),
                                  reason=f"no int8 decode-attention kernel: {NO_KERNEL}")
KERNEL = dict(atol=2e-5, rtol=1e-5)  # float32 rounding, summed over a few hundred keys and two layers


def checked_kernel(monkeypatch) -> list[float]:
    """Make every kernel call also run its PyTorch reference; returns the largest differences."""
    differences = []
    call = kv_attention.Int8DecodeAttention.__call__

    def checked(self, step, layer, q, slopes, scale):
        out = call(self, step, layer, q, slopes, scale)
        expected = kv_attention.decode_attention_reference(step, layer, q, slopes, scale)
        differences.append(float((out.float() - expected.float()).abs().max()))
        return out

    monkeypatch.setattr(kv_attention.Int8DecodeAttention, "__call__", checked)
    return differences


@torch.no_grad()
def decode_script(net, kernel: bool, ring: dict, jump: int) -> torch.Tensor:
    """Logits of one mixed script through a 3-slot int8 cache: a left-padded batch prefilled into
    slots 2 and 0, decoded one position at a time (the kernel's calls) from `jump` positions further
    on, and a padding token as a fresh slot's first entry (a row that may read no key at all)."""
    capacity = 28 if ring else 64
    cache = new_cache(net, "int8", slots=3, capacity=capacity, **ring)
    if kernel:
        cache.decode_attention = kv_attention.decode_attention_for(cache)
        assert cache.decode_attention is not None
    prompt, mask = tokens(12, seed=11, rows=2), torch.ones(2, 12, dtype=torch.bool)
    mask[0, :5] = False
    seen = [net(prompt, prompt_positions(mask, 2, 12, "cpu"), key_mask=mask, cache=cache, slots=[2, 0])[:, -1]]
    for step in range(30 if ring else 20):
        positions = cache.next_position[[2, 0]][:, None] + jump
        seen.append(net(tokens(1, seed=20 + step, rows=2), positions, cache=cache, slots=[2, 0])[:, -1])
    pad = net(tokens(1, seed=50), key_mask=torch.zeros(1, 1, dtype=torch.bool), cache=cache, slots=[1])[:, -1]
    return torch.cat([torch.stack(seen, 1).flatten(0, 1), pad])


@needs_kernel
@pytest.mark.parametrize("overrides, ring, jump", [
    ({}, {}, 0),
    (dict(heads=20, attn_kv_heads=2, alibi_num_heads=5), {}, 0),  # 10 heads per kv head: heads in lanes
    (dict(dim_head=17, qk_norm=False, attn_qk_norm=False), {}, 0),  # a partial vector; strided queries
    (SHORT_XPOS, {}, 400),  # the center moves on: keys hundreds of positions behind, factors ~0
    ({}, dict(window=16, sink_tokens=2), 0),  # a ring buffer that wraps: gaps in the positions read
], ids=["tiles", "heads-in-lanes", "odd-head-size", "xpos-center-moves", "ring"])
def test_decode_kernel_equals_its_reference_and_the_dequantizing_path(overrides, ring, jump, monkeypatch):
    net = random_net(**overrides).eval()
    differences = checked_kernel(monkeypatch)
    through_kernel = decode_script(net, True, ring, jump)
    decode_calls = 30 if ring else 20  # and the padding token's
    assert len(differences) == net.config.depth * (decode_calls + 1)  # each, in every layer
    assert max(differences) < 1e-5
    torch.testing.assert_close(through_kernel, decode_script(net, False, ring, jump), **KERNEL)


@needs_kernel
@pytest.mark.parametrize("dtype, tolerance, amx", [(torch.float32, 1e-5, True), (torch.bfloat16, 2e-2, True),
                                                   (torch.bfloat16, 2e-2, False)])
def test_decode_kernel_splits_a_long_row_across_threads(dtype, tolerance, amx):
    """Two threads split 2,500 keys into ranges whose softmax sums one pass combines. 12 query
    heads per kv head of 32 channels: float32 puts the heads in lanes; bf16 reads bf16 scales and
    queries, writes bf16, and takes its scores from AMX tiles where the CPU has them, or (amx
    False: what a CPU without AMX, e.g. AMD's, runs) with the heads in lanes."""
    config, generator = Config.from_preset("tiny", heads=24, attn_kv_heads=2, dim_head=32), torch.Generator().manual_seed(3)
    cache = KVCache(config, 1, 2501, dtype=dtype, device="cpu", kv_dtype="int8")
    K, H, D = config.attn_kv_heads, config.heads, config.dim_head
    with torch.no_grad():
        for count in (2500, 1):
            step = cache.append(None, None, None, count)
            for layer in range(config.depth):
                step.store(layer, *(torch.randn(1, K, count, D, generator=generator).to(dtype) for _ in "kv"))
        q, slopes = torch.randn(1, H, 1, D, generator=generator).to(dtype), torch.rand(H, generator=generator) / 8
        kernel, threads = kv_attention.Int8DecodeAttention(amx=amx), torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            out = kernel(step, 1, q, slopes, 0.3)
        finally:
            torch.set_num_threads(threads)
    assert out.dtype == dtype and out.shape == (1, H, 1, D)
    assert kernel._args.amx == (amx and dtype == torch.bfloat16 and kv_attention._amx_ready())
    expected = kv_attention.decode_attention_reference(step, 1, q, slopes, 0.3)
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("groups", [1, 3, 8])
def test_decode_kernel_rescales_across_blocks_as_its_reference(groups):
    """Up to 8 query heads per kv head (the softmax a head to a row, 16 keys a vector): 2,100 keys
    in ~40 blocks, with ALiBi slopes steep enough that later blocks beat the running max by more
    than the lazy margin (rescaling what was summed), on one thread and on two (each row's keys in
    two ranges, combined)."""
    config = Config.from_preset("tiny", heads=2 * groups, attn_kv_heads=2, dim_head=32, alibi_num_heads=1)
    generator = torch.Generator().manual_seed(groups)
    cache = KVCache(config, 1, 2101, dtype=torch.float32, device="cpu", kv_dtype="int8")
    with torch.no_grad():
        for count in (2100, 1):
            step = cache.append(None, None, None, count)
            for layer in range(config.depth):
                step.store(layer, *(torch.randn(1, 2, count, 32, generator=generator) for _ in "kv"))
        q = torch.randn(1, 2 * groups, 1, 32, generator=generator)
        slopes = torch.linspace(0.0, 0.2, 2 * groups)  # 0.2 a position: the max rises block after block
        expected = kv_attention.decode_attention_reference(step, 1, q, slopes, 0.3)
        threads = torch.get_num_threads()
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                out = kv_attention.Int8DecodeAttention()(step, 1, q, slopes, 0.3)
                torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
        finally:
            torch.set_num_threads(threads)


needs_amx = pytest.mark.skipif(NO_KERNEL is not None or not kv_attention._amx_ready(),
                               reason="no AMX tiles here: the int8 kernel's bf16 path takes FMAs")


@needs_amx
@pytest.mark.parametrize("groups, dim, context, window, peak", [
    (12, 128, 40, None, 1.0),  # one block
    (12, 128, 3000, None, 1.0),  # ~50 blocks in two threads' ranges, combined
    (12, 128, 700, None, 20.0),  # peaked weights: most keys' codes 0, the weights of whole blocks underflow
    (9, 96, 700, None, 1.0),  # a last pass of 32 channels; 9 heads of a tile's 16
    (16, 32, 300, None, 1.0),
    (12, 64, 200, 48, 1.0),  # a ring buffer (window 48, 2 sinks): its columns read out of position order
    (12, 256, 300, None, 1.0),  # past 128 channels: the scores reload their query tiles per chunk
], ids=["one-block", "long", "peaked", "dim-96", "dim-32", "ring", "dim-256"])
def test_amx_weighted_values_equal_the_fma_paths(groups, dim, context, window, peak):
    """Without xPos the AMX path's scores have exact inputs (int8 keys, bf16 queries: products
    exact, summed in float32 in another order), so it differs from the FMA path (`amx=False`, as
    on CPUs without AMX) in rounding and in its weighted values: int8 tile products of 16-bit
    weight codes (two u8 tiles), in blocks of up to 128 keys instead of 64. Its outputs equal the
    FMA path's but for a last-bit bf16 rounding in a few percent of entries: one ulp, or 1e-4
    near 0 (the codes' 2^-16 of the largest weight). One 8-bit code per weight fails this: 62-68%
    of entries differed, by up to 4 ulp."""
    config = Config.from_preset("tiny", heads=2 * groups, attn_kv_heads=2, dim_head=dim, rotary_xpos=False)
    generator = torch.Generator().manual_seed(context)
    ring = dict(window=window, sink_tokens=2) if window else {}
    capacity = window + 40 if window else context + 1  # (a ring takes chunks of up to capacity - window)
    cache = KVCache(config, 1, capacity, dtype=torch.bfloat16, device="cpu", kv_dtype="int8", **ring)
    with torch.no_grad():
        for count in [40] * (context // 40) + [context % 40, 1]:
            step = cache.append(None, None, None, count) if count else None
            for layer in range(config.depth if count else 0):
                step.store(layer, *(torch.randn(1, 2, count, dim, generator=generator).bfloat16() for _ in "kv"))
        q = (torch.randn(1, 2 * groups, 1, dim, generator=generator) * peak).bfloat16()
        slopes = torch.rand(2 * groups, generator=generator) / 64
        outs, threads = [], torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for amx in (True, False):
                kernel = kv_attention.Int8DecodeAttention(amx=amx)
                outs.append(kernel(step, 1, q, slopes, 0.3).float())
                assert kernel._args.amx == amx
        finally:
            torch.set_num_threads(threads)
    differ = outs[0] != outs[1]
    assert differ.float().mean() < 0.05
    # one bf16 ulp at most, or the codes' 2^-16 of the largest value where the output is near 0
    assert ((outs[0] - outs[1]).abs() <= outs[1].abs() * 2.0 ** -7 + 1e-4).all()
    expected = kv_attention.decode_attention_reference(step, 1, q, slopes, 0.3).float()
    torch.testing.assert_close(outs[1], expected, atol=1e-2, rtol=1e-2)  # and the FMA path is right


@needs_amx
def test_amx_path_reads_a_wrapped_xpos_ring_as_the_fma_path():
    """xPos over a ring buffer that has wrapped (blocks whose positions have a gap take each key's
    factors exactly): the AMX path agrees with the FMA path to its bf16 roundings of queries and
    keys times factors, as the long-row test allows."""
    config = Config.from_preset("tiny", heads=24, attn_kv_heads=2, dim_head=64)
    generator = torch.Generator().manual_seed(9)
    cache = KVCache(config, 1, 300 + 40, dtype=torch.bfloat16, device="cpu", kv_dtype="int8", window=300,
                    sink_tokens=4)
    with torch.no_grad():
        for count in [40] * 12 + [1]:  # 481 positions through 340 columns: wrapped
            step = cache.append(None, None, None, count)
            for layer in range(config.depth):
                step.store(layer, *(torch.randn(1, 2, count, 64, generator=generator).bfloat16() for _ in "kv"))
        assert not bool((cache.positions[0, 1:] > cache.positions[0, :-1]).all())  # out of order: wrapped
        q, slopes = torch.randn(1, 24, 1, 64, generator=generator).bfloat16(), torch.rand(24, generator=generator) / 8
        outs = [kv_attention.Int8DecodeAttention(amx=amx)(step, 1, q, slopes, 0.3).float() for amx in (True, False)]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    expected = kv_attention.decode_attention_reference(step, 1, q, slopes, 0.3).float()
    torch.testing.assert_close(outs[1], expected, atol=1e-2, rtol=1e-2)


@needs_kernel
def test_generate_decodes_through_the_kernel_and_falls_back_without_it(net, monkeypatch):
    differences = checked_kernel(monkeypatch)
    prompt = torch.tensor(list(range(20, 44)))
    ours = generate(net, prompt, 12, temperature=0, kv_cache_dtype="int8")
    assert differences and max(differences) < 1e-5  # the kernel read the cache
    monkeypatch.setattr(kv_attention, "_kernel", lambda: None)  # as on a CPU without AVX-512 or a compiler
    assert generation_cache(net, 1, 8, 4, None, kv_dtype="int8").decode_attention is None
    assert torch.equal(generate(net, prompt, 12, temperature=0, kv_cache_dtype="int8"), ours)
    assert kv_attention.decode_attention_for(new_cache(net, "auto")) is None  # not int8: SDPA as before


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [{}, dict(dim_head=17, qk_norm=False, attn_qk_norm=False, rotary_xpos=False)],
                         ids=["xpos", "odd-head-size-no-xpos"])
def test_kv_store_kernel_writes_the_pytorch_paths_entries(dtype, overrides):
    """A decode step's keys and values through kv_store.c (`Int8DecodeAttention.store`) land as the
    PyTorch path writes them, bit for bit: codes and scales of two rows in slots 2 and 0 at
    different columns, keys times their inverse xPos factors, a strided value input, an all-zero
    head (scale 0, codes 0) and a large one, in float32 and bf16 caches."""
    config = Config.from_preset("tiny", **overrides)
    caches = [KVCache(config, 3, 40, dtype=dtype, device="cpu", kv_dtype="int8") for _ in "pk"]
    caches[1].decode_attention = kv_attention.decode_attention_for(caches[1])
    assert caches[1].decode_attention is not None
    K, D, generator = config.attn_kv_heads, config.dim_head, torch.Generator().manual_seed(5)
    with torch.no_grad():
        steps = []
        for cache in caches:
            cache.append([2], torch.arange(9)[None], None, 9)
            cache.append([0], torch.arange(4)[None], None, 4)
            steps.append(cache.append([2, 0], torch.tensor([[9], [4]]), None, 1))
        assert steps[0].decode_attention is None and steps[1].decode_attention is caches[1].decode_attention
        assert (steps[1].xpos_factors is not None) == config.rotary_xpos
        for layer in range(config.depth):
            k = torch.randn(2, K, 1, D, generator=generator).to(dtype)
            k[0, 0] = 0.0
            k[1, -1] *= 1e4
            v = torch.randn(2, 3 * K, 1, D, generator=generator).to(dtype)[:, K : 2 * K]  # strided
            for step in steps:
                step.store(layer, k, v)
    for stored, expected in zip(caches[1].storage, caches[0].storage):
        assert torch.equal(stored, expected)
    assert caches[1].k_scale[:, 2, 0, 9].eq(0).all()  # the zero head: scale 0 (codes 0)

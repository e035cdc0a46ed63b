"""What an int8 KV cache costs and saves: held-out bits per byte and decode speed against bf16.

For a trained checkpoint (default: `make demo`'s runs/demo), loaded in bf16 as `bench_quantize.py`
does, on Shakespeare's held-out plays (what `andromeda eval` reads by default):

1. Quality: bits per byte scored through a bf16 and an int8 KV cache (`evaluate(...,
   kv_cache_dtype=...)`: every query reads the keys and values as the cache stores them, as
   decoding does), at 1x and 8x the training length; the same windows for both. And greedy
   continuations of `--prompts` prompts (held-out lines, 32 tokens each, as `bench_quantize.py`
   picks them), `--new-tokens` each: the positions equal to the bf16 cache's. Scoring and
   prefill run attention on the fused kernels (SDPA) whatever the checkpoint's config says.
2. Speed: one decode step at a context of `--context` tokens (default 8192, held-out text
   prefilled once per cache), a bf16 cache read two ways: by PyTorch's SDPA, and by the fused
   decode attention (`native.decode_sdpa_for`, what `generate` and the server give a bf16 cache on
   the CPU); an int8 cache read two ways: dequantized for the model's attention (SDPA, or the
   reference einsums), and by the int8 decode-attention kernel (`inference.kv_attention`, what
   `generate` and the server use on the CPU); interleaved (A, B, C, D, A, ...), medians (the fused
   attention stands in for SDPA only: in the reference row the bf16 caches both read through the
   einsums); after each step the slot is truncated back to the context, so every step reads the
   same context. Then the same for attention alone at the 2.5 B default's shape
   (24 query and 2 key/value heads of 128, 32 layers; random keys, values and queries): the
   whole decode step's attention, its keys and values written included.
3. Memory: bytes per token of keys and values for this model and for the 2.5 B default.

    python benchmarks/bench_kv_cache.py --checkpoint runs/demo
    python benchmarks/bench_kv_cache.py --max-windows 64 --repeats 10   # a quick estimate
    python benchmarks/bench_kv_cache.py --skip quality --context 16384    # speed only
    python benchmarks/bench_kv_cache.py --skip quality --threads 2        # speed on 2 threads
"""

from __future__ import annotations

import argparse

import torch

import common
from andromeda import Config
from andromeda.checkpoint import load_checkpoint_tokenizer, load_train_config, load_transformer
from andromeda.data import TokenStore, cache_root, resolve_data, shakespeare_corpus
from andromeda.evaluation import evaluate
from andromeda.inference.generate import decode_one, prefill
from andromeda.inference.kv_attention import decode_attention_for, unavailable_reason
from andromeda.inference.native import decode_sdpa_for
from andromeda.inference.native import unavailable_reason as native_unavailable
from andromeda.model import KVCache
from andromeda.model.attention import Attention, AttentionInputs, attend

KINDS = {"bf16": "auto", "int8": "int8"}  # label -> kv_dtype, for a bf16 model
KERNEL = "int8 kernel"  # an int8 cache read by the decode-attention kernel
FUSED = "bf16 fused"  # a bf16 cache given the fused decode attention, as `generate` gives it on the CPU
SPEED_LABELS = ("bf16", FUSED, "int8", KERNEL)


def new_cache(config: Config, capacity: int, label: str) -> KVCache:
    """A one-slot bf16 model's cache for `label` (a KINDS label, KERNEL or FUSED)."""
    kv_dtype = "auto" if label == FUSED else KINDS.get(label, "int8")
    cache = KVCache(config, 1, capacity, dtype=torch.bfloat16, device="cpu", kv_dtype=kv_dtype)
    if label == FUSED:
        cache.decode_sdpa = decode_sdpa_for(cache)
        if cache.decode_sdpa is None:
            raise SystemExit(f"no fused decode attention here: {native_unavailable() or 'ops.cpp did not build'}")
    if label == KERNEL:
        cache.decode_attention = decode_attention_for(cache)
        if cache.decode_attention is None:
            raise SystemExit(f"no int8 decode-attention kernel here: {unavailable_reason()}")
    return cache


@torch.inference_mode()
def agreement(net, prompts: list[torch.Tensor], new_tokens: int) -> None:
    """Greedy continuations through each cache: how many tokens equal the bf16 cache's."""
    continuations = {}
    for label in (*KINDS, KERNEL):
        rows = []
        for prompt in prompts:
            cache = new_cache(net.config, len(prompt) + new_tokens, label)
            logits = prefill(net, prompt[None], torch.arange(len(prompt))[None], None, cache)
            row = []
            for _ in range(new_tokens):
                row.append(logits.argmax(-1))
                logits = decode_one(net, row[-1][:, None], None, cache)
            rows.append(torch.cat(row))
        continuations[label] = torch.stack(rows)  # (prompts, new_tokens)
    for label in ("int8", KERNEL):
        same = continuations[label] == continuations["bf16"]
        prefixes = [int((~row).nonzero()[0]) if (~row).any() else new_tokens for row in same]
        print(f"\nGreedy, {len(prompts)} prompts x {new_tokens} tokens: {label} KV equals bf16 KV at {int(same.sum())} "
              f"of {same.numel()} positions ({same.float().mean():.0%}); tokens before the first difference: "
              f"{', '.join(map(str, prefixes))}")
    kernel_same = continuations[KERNEL] == continuations["int8"]
    print(f"int8 kernel equals int8 dequantized at {int(kernel_same.sum())} of {kernel_same.numel()} positions")


def quality(net, store: TokenStore, lengths: list[int], args: argparse.Namespace) -> None:
    print("| eval length | bf16 KV bits/byte | int8 KV bits/byte | int8 vs bf16 | tokens scored |")
    print("|---|---|---|---|---|")
    for length in lengths:
        results = {label: evaluate(net, store.tokens, length, args.batch_size, store.num_bytes,
                                   max_windows=args.max_windows, kv_cache_dtype=kv) for label, kv in KINDS.items()}
        bf16, int8 = results["bf16"]["bits_per_byte"], results["int8"]["bits_per_byte"]
        print(f"| {length} | {bf16:.4f} | {int8:.4f} | {(int8 / bf16 - 1) * 100:+.3f}% | "
              f"{results['int8']['tokens']:,} |", flush=True)


@torch.inference_mode()
def speed(net, store: TokenStore, args: argparse.Namespace) -> None:
    context = args.context
    prompt = torch.tensor(store.tokens[:context], dtype=torch.long)[None]  # (1, context): a copy (read-only store)
    if prompt.shape[1] < context:
        raise SystemExit(f"the held-out text has {prompt.shape[1]} tokens, fewer than --context {context}")
    caches = {}
    for label in SPEED_LABELS:
        caches[label] = new_cache(net.config, context + 1, label)
        prefill(net, prompt, torch.arange(context)[None], None, caches[label])
    token = prompt[:, -1:]

    def step(cache: KVCache) -> None:
        decode_one(net, token, None, cache)
        cache.truncate(0, context)

    print("| attention | bf16 KV tok/s | bf16 KV fused tok/s | int8 KV dequantized tok/s | int8 KV kernel tok/s | "
          "fused vs bf16 | dequantized vs bf16 | kernel vs bf16 | kernel vs fused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, flash in (("fused (SDPA)", True), ("reference", False)):
        use_fused_attention(net, flash)  # the kernel reads the int8 cache either way
        times = common.alternate({label: (lambda c=cache: step(c)) for label, cache in caches.items()},
                                 args.repeats, warmup=2)
        rate = {label: 1 / common.median(seconds) for label, seconds in times.items()}
        print(f"| {name} | {rate['bf16']:.1f} | {rate[FUSED]:.1f} | {rate['int8']:.1f} | {rate[KERNEL]:.1f} | "
              f"{rate[FUSED] / rate['bf16']:.2f}x | {rate['int8'] / rate['bf16']:.2f}x | "
              f"{rate[KERNEL] / rate['bf16']:.2f}x | {rate[KERNEL] / rate[FUSED]:.2f}x |", flush=True)
    use_fused_attention(net, True)


@torch.inference_mode()
def attention_speed(args: argparse.Namespace) -> None:
    """One decode step's attention at the 2.5 B default's shape, every layer: the new keys and
    values written, then attention over the context (random data, bf16; SDPA's fused path)."""
    config, context = Config(), args.context
    H, K, D = config.heads, config.attn_kv_heads, config.dim_head
    generator = torch.Generator().manual_seed(0)
    caches = {}
    for label in SPEED_LABELS:
        cache = caches[label] = new_cache(config, context + 1, label)
        filled = cache.append(None, None, None, context)
        for layer in range(config.depth):  # QK-normed keys, as the model's
            keys = torch.nn.functional.normalize(torch.randn(1, K, context, D, generator=generator), dim=-1) * 4
            filled.store(layer, keys.to(torch.bfloat16), torch.randn(1, K, context, D, generator=generator).bfloat16())
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    q = torch.randn(1, H, 1, D, generator=generator).bfloat16()
    new = torch.randn(1, K, 1, D, generator=generator).bfloat16()

    def step(cache: KVCache) -> None:
        now = cache.append(None, None, None, 1)
        inputs = AttentionInputs(now.q_pos, now.k_pos, None, slopes, now.k_valid, now)
        for layer in range(config.depth):
            if now.decode_attention is not None:
                now.store(layer, new, new)
                now.decode_attention(now, layer, q, slopes, 0.1)
            else:
                keys, values = now.write(layer, new, new)
                attend(q, keys, values, inputs, scale=0.1, flash=True)
        cache.truncate(0, context)

    times = common.alternate({label: (lambda c=cache: step(c)) for label, cache in caches.items()}, args.repeats,
                             warmup=2)
    ms = {label: 1000 * common.median(seconds) for label, seconds in times.items()}
    print("| bf16 KV ms | bf16 KV fused ms | int8 KV dequantized ms | int8 KV kernel ms | fused vs bf16 | "
          "dequantized vs bf16 | kernel vs bf16 | kernel vs fused |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {ms['bf16']:.1f} | {ms[FUSED]:.1f} | {ms['int8']:.1f} | {ms[KERNEL]:.1f} | {ms['bf16'] / ms[FUSED]:.2f}x | "
          f"{ms['bf16'] / ms['int8']:.2f}x | {ms['bf16'] / ms[KERNEL]:.2f}x | {ms[FUSED] / ms[KERNEL]:.2f}x |", flush=True)


def use_fused_attention(net, flash: bool) -> None:
    """Switch every layer to the fused kernels (SDPA) or to the reference einsums."""
    for module in net.modules():
        if isinstance(module, Attention):
            module.flash = flash


def memory(config: Config) -> None:
    print("| model | bf16 KV bytes/token | int8 KV bytes/token | ratio |")
    print("|---|---|---|---|")
    for name, model in (("this checkpoint", config), ("2.5 B default (32 layers, 2 kv heads of 128)", Config())):
        sizes = {label: KVCache(model, 1, 1, dtype=torch.bfloat16, device="meta", kv_dtype=kv).bytes_per_token
                 for label, kv in KINDS.items()}
        print(f"| {name} | {sizes['bf16']:,} | {sizes['int8']:,} | {sizes['int8'] / sizes['bf16']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--seq-len", type=int, nargs="+",
                        help="evaluation lengths (default: 1x and 8x the training seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, help="score only N evenly spread windows per length")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192, help="decode context in tokens")
    parser.add_argument("--repeats", type=int, default=20, help="timed decode steps per cache and path")
    parser.add_argument("--skip", choices=("quality", "speed", "attention"), nargs="*", default=[])
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    trained = int((load_train_config(args.checkpoint) or {}).get("seq_len", 256))
    lengths = args.seq_len or [trained, 8 * trained]
    files = resolve_data([shakespeare_corpus() / "heldout"])
    store = TokenStore(files, tokenizer, cache_dir=cache_root() / "tokens")
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if len(line) > 40]
    prompts = [torch.tensor(tokenizer.encode(lines[i * len(lines) // args.prompts])[:32])
               for i in range(args.prompts)]
    net = load_transformer(args.checkpoint, dtype=torch.bfloat16).eval()
    use_fused_attention(net, True)  # scoring and prefill: the fused kernels, whatever the config says

    print(f"\n## KV cache: bf16 vs int8, {args.checkpoint} (trained at {trained} tokens)\n")
    print(f"{net.num_parameters():,} parameters in bf16; held-out {store.num_bytes:,} bytes ({len(store):,} tokens)"
          f"{f', {args.max_windows} windows per length' if args.max_windows else ''}; "
          f"{common._cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    memory(net.config)
    if "quality" not in args.skip:
        print()
        quality(net, store, lengths, args)
        agreement(net, prompts, args.new_tokens)
    if "speed" not in args.skip:
        print(f"\nOne decode step at {args.context:,} tokens of context, batch 1, median of {args.repeats}:\n")
        speed(net, store, args)
    if "attention" not in args.skip:
        print(f"\nAttention of one decode step at {args.context:,} tokens of context, the 2.5 B default's shape "
              f"(24 query / 2 kv heads of 128, 32 layers), median of {args.repeats}:\n")
        attention_speed(args)


if __name__ == "__main__":
    main()

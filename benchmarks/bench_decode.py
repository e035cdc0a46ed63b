"""Decoding throughput: new tokens per second of KV-cached generation.

(a) Against x-transformers 2.31.10 with the same weights, in one process, interleaved A, B, A, B:
the seed's features (4 of 8 heads ALiBi, rotary xPos, 2 kv heads, QK-norm with dim scale) at
dim 512, depth 8, vocabulary 50432; CPU fp32, batch 1, greedy. The peer decodes with
`cache_kv=False`: its cached path crashes when ALiBi and rotary embeddings are combined (the
script shows the error), so every peer step recomputes the whole prefix.

(b) `--big`: the 2.5 B default model in bf16 on CPU against the memory-bandwidth bound. A decode
step must read every weight once (all but the embedding table, of which it reads one row), so
tokens/s <= bandwidth / streamed weight bytes; the bandwidth is measured here by reading a
multi-GiB bf16 tensor. The library's decode steps (ATen's matrix-vector kernel) are timed against
PyTorch's default kernel choice (oneDNN) for the same model.

    python benchmarks/bench_decode.py              # (a): 256-token prompt, 128 new tokens
    python benchmarks/bench_decode.py --quick      # (a): 64-token prompt, 16 new tokens
    python benchmarks/bench_decode.py --big        # (b): 16-token prompt, 16 new tokens (~6 GB RAM)
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import torch

import common
from andromeda import Andromeda, Config

log = logging.getLogger("bench_decode")


def small_config(max_seq_len: int) -> Config:
    """The seed's feature mix at dim 512 (the issue's decode setting)."""
    return Config(num_tokens=50432, max_seq_len=max_seq_len, dim=512, depth=8, dim_head=64, heads=8,
                  alibi_num_heads=4, attn_kv_heads=2)


def peer_cached_error(wrapper, prompt: torch.Tensor) -> str:
    """What x-transformers' KV-cached generation does with this model: its error, or 'works'."""
    try:
        wrapper.generate(prompt, 2, temperature=0.0, cache_kv=True)
    except Exception as error:  # reported, not handled: any failure is the finding
        return f"{type(error).__name__}: {error}"
    return "works"


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    differ = (a != b).flatten().nonzero()
    return a.numel() if len(differ) == 0 else int(differ[0])


def bench_peer(args: argparse.Namespace) -> None:
    import x_transformers

    prompt_len, new_tokens = (64, 16) if args.quick else (args.prompt_len, args.new_tokens)
    config = small_config(max_seq_len=prompt_len + new_tokens)
    ours, peer = common.matched_pair(config, seed=args.seed)
    wrapper = x_transformers.AutoregressiveWrapper(peer)
    prompt = torch.randint(0, config.num_tokens, (1, prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))

    crash = peer_cached_error(wrapper, prompt)
    print(f"- x-transformers cache_kv=True with ALiBi + rotary xPos: {crash}")

    outputs: dict[str, torch.Tensor] = {}

    def run_ours() -> None:
        outputs["andromeda"] = ours.generate(prompt, new_tokens, temperature=0)

    def run_peer() -> None:
        outputs["x-transformers"] = wrapper.generate(prompt, new_tokens, temperature=0.0,
                                                     cache_kv=False)

    # Warm up on short runs: the peer's full run is the slow part of the whole benchmark.
    ours.generate(prompt, 2, temperature=0)
    wrapper.generate(prompt, 2, temperature=0.0, cache_kv=False)
    times = common.alternate({"andromeda": run_ours, "x-transformers": run_peer}, args.repeats,
                             warmup=0)
    agree = leading_agreement(outputs["andromeda"], outputs["x-transformers"])
    print(f"- greedy tokens identical to the peer's: first {agree} of {new_tokens}")
    ours_rate = new_tokens / common.median(times["andromeda"])
    peer_rate = new_tokens / common.median(times["x-transformers"])
    prefill = common.median([common.time_call(lambda: ours.generate(prompt, 1, temperature=0))
                             for _ in range(3)])
    step_ms = (common.median(times["andromeda"]) - prefill) / (new_tokens - 1) * 1e3
    print(f"- andromeda: prefill of {prompt_len} tokens {prefill * 1e3:.1f} ms, then "
          f"{step_ms:.2f} ms per token")
    print()
    print(common.markdown_table(
        ["decode, CPU fp32, batch 1", "prompt", "new", "andromeda tok/s", "x-transformers tok/s",
         "speed-up"],
        [["dim 512, depth 8, seed features", prompt_len, new_tokens, f"{ours_rate:.1f}",
          f"{peer_rate:.2f}", f"{ours_rate / peer_rate:.1f}x"]]))


def read_bandwidth(gib: float, repeats: int = 5) -> float:
    """Bytes/s of reading a `gib`-GiB bf16 tensor (best of `repeats` sums): the rate at which
    this machine can stream weights from memory."""
    data = torch.ones(int(gib * common.GIB) // 2, dtype=torch.bfloat16)
    data.sum()
    best = min(common.time_call(data.sum) for _ in range(repeats))
    return data.numel() * data.element_size() / best


def decode_rate(model: Andromeda, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s): the steps after the first, timed as they stream."""
    start = time.perf_counter()
    stamps = []
    for _ in model.decoder.stream(prompt, new_tokens, temperature=0):
        stamps.append(time.perf_counter())
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_big(args: argparse.Namespace) -> None:
    bandwidth = read_bandwidth(args.bandwidth_gib)
    gc.collect()
    log.info("building the default model in bf16")
    model = Andromeda.from_config("default", dtype=torch.bfloat16)
    net = model.Andromeda
    streamed = sum(p.numel() * p.element_size() for name, p in net.named_parameters()
                   if name != "token_emb.weight")
    bound = bandwidth / streamed
    prompt = torch.randint(0, net.config.num_tokens, (1, args.big_prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))
    model.decoder.generate(prompt, 2, temperature=0)  # warm-up
    prefill, rate = decode_rate(model, prompt, args.big_new_tokens)
    rows = [[f"2.5 B default, bf16", args.big_prompt_len, args.big_new_tokens, f"{prefill:.2f} s", f"{rate:.2f}",
             f"{bound:.2f}", f"{rate / bound:.0%}"]]
    print(f"- read bandwidth: {bandwidth / 1e9:.1f} GB/s; weights streamed per token: "
          f"{streamed / 1e9:.2f} GB; bound = {bound:.2f} tokens/s")
    print()
    print(common.markdown_table(
        ["decode, CPU, batch 1", "prompt", "new", "prefill", "tok/s", "bandwidth bound tok/s",
         "of bound"], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="(a) with a 64-token prompt, 16 new tokens")
    parser.add_argument("--big", action="store_true", help="(b): the 2.5 B model in bf16 against bandwidth")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side in (a)")
    parser.add_argument("--big-prompt-len", type=int, default=16)
    parser.add_argument("--big-new-tokens", type=int, default=16)
    parser.add_argument("--bandwidth-gib", type=float, default=2.0, help="size of the bandwidth probe")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"- machine: {common.environment()}")
    if args.big:
        bench_big(args)
    else:
        bench_peer(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

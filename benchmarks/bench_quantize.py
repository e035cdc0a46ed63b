"""What quantization costs in quality: held-out bits per byte and greedy agreement against bf16.

For a trained checkpoint (default: `make demo`'s runs/demo), each weight scheme is scored on the
same held-out text (Shakespeare's held-out plays, as `andromeda eval` reads them by default) and
asked for greedy continuations of the same 10 prompts (lines spread evenly over the held-out
text, 32 tokens each), 64 new tokens each; agreement counts the positions whose token equals
bf16's, and the lengths of the prefixes identical to bf16's. The schemes quantize the bf16
model as `andromeda quantize` / `--quantize` do, and are prepared for decoding as
`load_for_inference` prepares them (int8: packed for fbgemm's one-row product).

Scoring whole windows runs every product with many rows; decoding runs them one row at a time,
where int8 quantizes the row's activations as well (`quantized_linear`). So the held-out text is
also scored *as decoded*: `--decode-windows` windows spread over it, fed one token a step through
the KV cache, bits/byte over their next-token predictions.

    python benchmarks/bench_quantize.py --checkpoint runs/demo
    python benchmarks/bench_quantize.py --checkpoint runs/demo --schemes int8,int4:64,int4:32 --seq-len 1024

The demo preset is 192 wide, which a group of 128 does not divide: int4 is measured there with
groups of 64 and 32 (`int4:128` works for models whose widths it divides, the 2.5 B default).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import common
from andromeda.checkpoint import load_checkpoint_tokenizer, load_train_config, load_transformer
from andromeda.data import TokenStore, cache_root, resolve_data, shakespeare_corpus
from andromeda.evaluation import evaluate
from andromeda.inference.generate import decode_one, generate
from andromeda.inference.quantized_linear import pack_for_decoding
from andromeda.model import KVCache
from andromeda.inference.quantize import quantize


def parse_schemes(text: str) -> list[tuple[str, int]]:
    schemes = []
    for item in text.split(","):
        name, _, group = item.partition(":")
        schemes.append((name, int(group) if group else 128))
    return schemes


def decoded_bits_per_byte(net: torch.nn.Module, tokens: torch.Tensor, seq_len: int, windows: int,
                          tokenizer) -> float:
    """Bits per byte of `windows` windows of `tokens` spread evenly, each fed one token a step
    through a KV cache (batch 1): every product has one row, as when decoding."""
    nats, nbytes = 0.0, 0
    for i in range(windows):
        start = i * (len(tokens) - seq_len - 1) // max(1, windows - 1) if windows > 1 else 0
        window = torch.as_tensor(tokens[start : start + seq_len + 1].astype("int64"))
        cache = KVCache(net.config, 1, seq_len, dtype=next(net.parameters()).dtype, device="cpu")
        with torch.no_grad():
            for t in range(seq_len):
                logits = decode_one(net, window[t : t + 1].view(1, 1), None, cache).float()
                nats -= torch.log_softmax(logits, dim=-1)[0, window[t + 1]].item()
        nbytes += len(tokenizer.decode(window[1:].tolist()).encode("utf-8"))
    return nats / math.log(2) / nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--schemes", default="int8,int4:64,int4:32", help="comma list of int8, int4:GROUP")
    parser.add_argument("--seq-len", type=int, help="evaluation window (default: the training seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--decode-windows", type=int, default=4, help="windows scored one token a step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    saved = load_train_config(args.checkpoint) or {}
    seq_len = args.seq_len or int(saved.get("seq_len", 256))
    files = resolve_data([shakespeare_corpus() / "heldout"])
    store = TokenStore(files, tokenizer, cache_dir=cache_root() / "tokens")
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    lines = [line for line in text.splitlines() if len(line) > 40]
    prompts = [torch.tensor(tokenizer.encode(lines[i * len(lines) // args.prompts])[:32])
               for i in range(args.prompts)]

    bf16 = load_transformer(args.checkpoint, dtype=torch.bfloat16)
    variants = [("bf16", bf16)]
    for scheme, group in parse_schemes(args.schemes):
        start = time.perf_counter()
        net = quantize(copy.deepcopy(bf16), scheme, group)
        pack_for_decoding(net)
        label = scheme if scheme == "int8" else f"int4 (group {group})"
        variants.append((label, net))
        print(f"quantized {label} in {time.perf_counter() - start:.1f} s", flush=True)

    print(f"\n## Quantization quality: {args.checkpoint}\n")
    print(f"{bf16.num_parameters():,} parameters; held-out {store.num_bytes:,} bytes ({len(store):,} tokens) "
          f"in windows of {seq_len}; {args.prompts} prompts x {args.new_tokens} greedy tokens; "
          f"{common._cpu_name()}, torch {torch.__version__}\n")
    print("| weights | bits/byte | vs bf16 | bits/byte decoded | vs bf16 | greedy tokens equal to bf16 "
          "| prefixes identical to bf16's (tokens) |")
    print("|---|---|---|---|---|---|---|")
    reference_bpb = reference_gen = reference_decoded = None
    for label, net in variants:
        result = evaluate(net, store.tokens, seq_len, args.batch_size, store.num_bytes)
        decoded = decoded_bits_per_byte(net, store.tokens, seq_len, args.decode_windows, tokenizer)
        reference_decoded = reference_decoded or decoded
        generated = torch.stack([generate(net, p, args.new_tokens, temperature=0)[0] for p in prompts])
        if reference_gen is None:
            reference_bpb, reference_gen = result["bits_per_byte"], generated
        same = generated == reference_gen
        agree = int(same.sum())
        prefixes = [int((~row).nonzero()[0]) if (~row).any() else args.new_tokens for row in same]
        change = (result["bits_per_byte"] / reference_bpb - 1) * 100
        decoded_change = (decoded / reference_decoded - 1) * 100
        print(f"| {label} | {result['bits_per_byte']:.4f} | {change:+.2f}% | {decoded:.4f} | {decoded_change:+.2f}% "
              f"| {agree} of {same.numel()} "
              f"({agree / same.numel():.0%}) | {', '.join(map(str, prefixes))} |", flush=True)


if __name__ == "__main__":
    main()

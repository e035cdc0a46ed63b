"""Multi-turn chat against `andromeda serve` with and without prefix reuse.

Two servers on 127.0.0.1 with the same checkpoint (random weights, byte tokenizer): one as it
starts by default (prefix reuse on), one with `--no-prefix-cache`. C conversations run at once,
each T turns: every turn sends the whole history so far (earlier user turns and the server's
replies) plus a new user turn of about USER characters, and streams N greedy new tokens. Reported
per server: time to first token (request sent to the first streamed chunk) of the first and of the
last two turns (median over conversations and repeats), the prompt length the last turn reaches
and the tokens the server reported as cached of it (usage), and whether every reply was identical
between the two.

The checkpoints are the models' presets with a `--context`-token context (the architectures'
relative positions take any length; the demo preset's own 1,024 would stop the history short of
1,000 tokens), and their output rows for every byte but printable ASCII and newline are zero, so
greedy replies are text that the next turn sends back byte for byte, as a trained model's replies
re-encode to the tokens it produced. (Random logits over all 258 ids reply with invalid UTF-8,
which the client reads as U+FFFD, three bytes: every turn's prefix would end at the reply's first
such byte, and the whole reply be prefilled again.)

    python benchmarks/bench_prefix_cache.py                        # demo preset, 8 x 6 turns
    python benchmarks/bench_prefix_cache.py --models demo 512x8 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from andromeda.checkpoint import save_pretrained
from andromeda.model import Transformer, build_transformer
from andromeda.tokenizers import ByteTokenizer
from bench_serve import MODELS, WORDS, Process, free_port

log = logging.getLogger("bench_prefix_cache")


def user_turn(conversation: int, turn: int, chars: int) -> str:
    words = [WORDS[(conversation * 7 + turn * 3 + i) % len(WORDS)] for i in range(chars // 4)]
    return f"\nUSER {turn}: " + " ".join(words)[:chars] + "\nASSISTANT:"


async def conversation(client, url: str, index: int, args: argparse.Namespace) -> list[dict]:
    history, turns = "", []
    for turn in range(args.turns):
        history += user_turn(index, turn, args.user_chars)
        body = {"prompt": history, "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        start, first, text, usage = time.perf_counter(), None, [], {}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {(await response.aread()).decode()}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    first = first or time.perf_counter()
                    text.append(chunk["choices"][0]["text"])
                usage = chunk.get("usage") or usage
        reply = "".join(text)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        turns.append({"ttft": first - start, "prompt_tokens": usage["prompt_tokens"], "cached": cached, "reply": reply})
        history += reply
    return turns


async def load(url: str, args: argparse.Namespace) -> list[list[dict]]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(conversation(client, url, i, args) for i in range(args.conversations)))


TEXT_BYTES = [ord("\n"), *range(32, 127)]  # what the replies are made of


def text_model(name: str, context: int) -> Transformer:
    """Model `name` at random with a `context`-token context whose greedy replies are text: every
    other id's output row is zero, so its logit is 0, below the largest of ~100 random ones."""
    net = build_transformer(MODELS[name]().replace(max_seq_len=context))
    keep = torch.zeros(net.config.num_tokens, dtype=torch.bool)
    keep[TEXT_BYTES] = True
    with torch.no_grad():
        net.to_logits.weight[~keep] = 0
    return net


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[list[object]]:
    torch.manual_seed(args.seed)
    net = text_model(name, args.context)
    checkpoint = workdir / name
    save_pretrained(net, checkpoint, tokenizer=ByteTokenizer())
    params = net.num_parameters()
    del net
    slots = ["--max-batch-size", str(args.conversations)]
    servers = {
        "prefix reuse": Process([sys.executable, "-m", "andromeda", "serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port := free_port()), *slots], port, workdir / f"{name}-reuse.log"),
        "--no-prefix-cache": Process([sys.executable, "-m", "andromeda", "serve", "--checkpoint", str(checkpoint),
                                      "--port", str(port2 := free_port()), "--no-prefix-cache", *slots], port2,
                                     workdir / f"{name}-off.log"),
    }
    results: dict[str, list[list[list[dict]]]] = {label: [] for label in servers}
    try:
        for server in servers.values():
            server.wait_ready()
        for repeat in range(args.repeats):
            for label, server in servers.items():  # alternating, so outside load slows both alike
                results[label].append(asyncio.run(load(server.url, args)))
                log.info("%s %s repeat %d done", name, label, repeat)
    finally:
        for server in servers.values():
            server.stop()
    replies = {label: [[t["reply"] for conv in run for t in conv] for run in runs] for label, runs in results.items()}
    same = all(a == b for a, b in zip(*replies.values()))
    rows, last_ttft = [], {}
    for label, runs in results.items():
        turns = [conv for run in runs for conv in run]
        first = statistics.median(conv[0]["ttft"] for conv in turns)
        last = statistics.median(t["ttft"] for conv in turns for t in conv[-2:])
        cached = statistics.median(conv[-1]["cached"] for conv in turns)
        tokens = statistics.median(conv[-1]["prompt_tokens"] for conv in turns)
        last_ttft[label] = last
        rows.append([f"{name} ({params / 1e6:.1f} M)", label, args.conversations, args.turns,
                     f"{cached:.0f} of {tokens:.0f}", f"{first * 1e3:.0f}", f"{last * 1e3:.0f}"])
    speedup = last_ttft["--no-prefix-cache"] / last_ttft["prefix reuse"]
    for row in rows:
        row.append(f"{speedup:.1f}x" if row[1] == "prefix reuse" else "1.0x")
        row.append("yes" if same else "NO")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo"])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-chars", type=int, default=60, help="characters (byte tokens) per user turn")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--context", type=int, default=2048, help="the checkpoints' context (max_seq_len)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    print(f"- machine: {common.environment()}")
    print(f"- load: {args.conversations} conversations at once x {args.turns} turns, each turn the whole "
          f"history + ~{args.user_chars} new characters, {args.new_tokens} greedy new tokens; "
          f"{args.context}-token context")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp))
    print(common.markdown_table(["model", "server", "conversations", "turns", "last turn: cached of prompt tokens",
                                 "TTFT turn 1 ms", "TTFT last 2 turns ms",
                                 "last turns vs off", "same replies"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

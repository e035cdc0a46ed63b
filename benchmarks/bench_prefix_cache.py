"""Multi-turn chat against `andromeda serve` with and without prefix reuse.

Two servers on 127.0.0.1 with the same checkpoint (random weights, byte tokenizer): one as it
starts by default (prefix reuse on), one with `--no-prefix-cache`. C conversations run at once,
each T turns: every turn sends the whole history so far (earlier user turns and the server's
replies) plus a new user turn of about USER characters, and streams N greedy new tokens. Reported
per server: time to first token (request sent to the first streamed chunk) of the first and of the
last two turns (median over conversations and repeats), the prompt length those turns reach, the
tokens the server reported as cached, and whether every reply was identical between the two.

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
from andromeda.model import build_transformer
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
        start, first, text, cached = time.perf_counter(), None, [], 0
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
                if chunk.get("usage"):
                    cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        reply = "".join(text)
        turns.append({"ttft": first - start, "prompt_chars": len(history), "cached": cached, "reply": reply})
        history += reply
    return turns


async def load(url: str, args: argparse.Namespace) -> list[list[dict]]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(conversation(client, url, i, args) for i in range(args.conversations)))


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[list[object]]:
    torch.manual_seed(args.seed)
    net = build_transformer(MODELS[name]())
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
        chars = statistics.median(conv[-1]["prompt_chars"] for conv in turns)
        last_ttft[label] = last
        rows.append([f"{name} ({params / 1e6:.1f} M)", label, args.conversations, args.turns, f"{chars:.0f}",
                     f"{cached:.0f}", f"{first * 1e3:.0f}", f"{last * 1e3:.0f}"])
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
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    print(f"- machine: {common.environment()}")
    print(f"- load: {args.conversations} conversations at once x {args.turns} turns, each turn the whole "
          f"history + ~{args.user_chars} new characters, {args.new_tokens} greedy new tokens")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp))
    print(common.markdown_table(["model", "server", "conversations", "turns", "last prompt (chars)",
                                 "cached (last turn)", "TTFT turn 1 ms", "TTFT last 2 turns ms",
                                 "last turns vs off", "same replies"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

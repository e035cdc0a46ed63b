"""Serving throughput and latency: `andromeda serve` (continuous batching) against a baseline that
serves one request at a time with `generate`.

Both servers run as their own processes on 127.0.0.1 with the same checkpoint (random weights,
byte tokenizer); a load generator here opens C concurrent clients, each sending R streamed
completion requests one after another (a PROMPT-token prompt, 128 new tokens, greedy,
ignore_eos so every request generates all 128). Reported per C: aggregate generated tokens/s
over the wall time of the whole load, and the time to first token (TTFT: request sent to the
first streamed chunk) p50 / p99 over all requests. Loads alternate between the two servers
(A, B, A, B, ...) and each figure is the median over --repeats runs, so outside load slows both
alike.

The baseline (`--baseline-server`, started by this script) is the thin wrapper a one-request
server would be: the same SSE wire format, a lock around `inference.generate.stream`.

    python benchmarks/bench_serve.py                   # demo preset and dim 512 / depth 8, C = 1, 4, 16
    python benchmarks/bench_serve.py --quick           # demo preset only, fewer requests
    python benchmarks/bench_serve.py --models demo --clients 1 16 --repeats 3
    python benchmarks/bench_serve.py --constrained     # our server at 16 clients: free vs constrained text
    python benchmarks/bench_serve.py --constrained --engine --models demo --clients 16 --new-tokens 64 --repeats 9
    python benchmarks/bench_serve.py --plain --models demo --clients 1 16 --requests 2 --new-tokens 64

Goal (issue #11): at 16 clients at least 6x the single-client tokens/s, with p50 TTFT under 2x
the single-client one.

--constrained (issue #22) loads our server alone at the largest C with plain (non-streamed)
requests, alternating: free text, a regex (`structured_outputs`), free text asking for each
request's length under the regex, a JSON schema (`response_format`), free text of its lengths.
It prints each constraint's generated tokens/s (from `usage.completion_tokens`, since a grammar
may end a choice early) against free text's of --new-tokens, and against free text's of the same
lengths: the grammar's own cost, without that of shorter requests; and the server's CPU time per
generated token (user + system, steadier than tokens/s on a machine other work shares). With
--engine, the same constraints and prompts on an EngineCore in this process, C sequences run to
their end against free text of the same lengths: the grammar's cost per token without HTTP.
Goal: constrained output costs at most 15% of the tokens/s.

--plain (issue #22) loads our server alone with plain (non-streamed) requests at each C, the
smallest first, alternating, and prints tokens/s against the smallest C: the load of a batch job
(32 requests of 64 new tokens from 16 clients against one at a time). Goal: >= 6x at 16 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request  # the serve extra; module level, for FastAPI's annotations
from fastapi.responses import StreamingResponse

import common
from andromeda import Config
from andromeda.checkpoint import save_pretrained
from andromeda.model import build_transformer
from andromeda.tokenizers import ByteTokenizer

log = logging.getLogger("bench_serve")

MODELS = {
    "demo": lambda: Config.from_preset("demo"),
    # The seed's feature mix at dim 512 / depth 8 (bench_decode's model) with the byte vocabulary,
    # so the server's tokenizer covers it.
    "512x8": lambda: Config.from_preset("demo", dim=512, depth=8, dim_head=64, heads=8, alibi_num_heads=4,
                                        attn_kv_heads=2, attn_flash=True),
}
WORDS = ("the quick brown fox jumps over a lazy dog while five boxing wizards jump quickly and "
         "sphinx of black quartz judges my vow").split()


# ----------------------------------------------------------------------------- the baseline server


def baseline_server(checkpoint: str, port: int, threads: int | None) -> None:
    """One request at a time: a lock around `stream`, each token sent as it comes."""
    import threading

    import uvicorn

    from andromeda.checkpoint import load_checkpoint_tokenizer, load_transformer
    from andromeda.inference.generate import IncrementalDecoder, stream

    if threads:
        torch.set_num_threads(threads)
    net = load_transformer(checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = torch.tensor([tokenizer.eos_id] + tokenizer.encode(body["prompt"]))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            with lock:
                decoder = IncrementalDecoder(tokenizer)
                for tokens in stream(net, ids, body["max_tokens"], temperature=0):
                    loop.call_soon_threadsafe(queue.put_nowait, decoder.push(int(tokens[0])))
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=work, daemon=True).start()

        async def events():
            while (piece := await queue.get()) is not None:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ----------------------------------------------------------------------------- load


def prompt_text(index: int, tokens: int) -> str:
    """A distinct prompt of `tokens` bytes (the byte tokenizer: one token per ASCII character;
    the server adds its eos in front)."""
    words = [WORDS[(index * 7 + i * 3) % len(WORDS)] for i in range(tokens)]
    return " ".join(words)[: tokens - 1] + "."


async def one_request(client, url: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(TTFT seconds, total seconds, chunks) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first = None
    chunks = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    return first, time.perf_counter() - start, chunks


async def load(url: str, clients: int, requests_per_client: int, prompt_tokens: int, new_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, prompt_text(999, prompt_tokens), 4)  # connections and kernels warm

        async def client_loop(c: int) -> list[float]:
            ttfts = []
            for r in range(requests_per_client):
                ttft, _, _ = await one_request(client, url, prompt_text(c * 31 + r, prompt_tokens), new_tokens)
                ttfts.append(ttft)
            return ttfts

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        wall = time.perf_counter() - start
    ttfts = sorted(t for r in results for t in r)
    return {"tok_s": clients * requests_per_client * new_tokens / wall, "wall": wall, "ttft": ttfts}


CONSTRAINTS = {
    "free text": {},
    "regex": {"structured_outputs": {"regex": "[a-z ,.]{8,}"}},
    "json schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "words", "schema": {
        "type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
        "required": ["words"]}}}},
}


async def constrained_load(url: str, clients: int, requests_per_client: int, prompt_tokens: int, new_tokens: int,
                           extra: dict, lengths: dict[tuple[int, int], int] | None = None
                           ) -> tuple[float, dict[tuple[int, int], int]]:
    """Generated tokens/s of C clients each sending R plain completions with `extra` in the body,
    and each request's generated tokens by (client, request). With `lengths`, request (c, r) asks
    for lengths[(c, r)] tokens instead of `new_tokens`."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(c: int, r: int, max_tokens: int) -> int:
            body = {"prompt": prompt_text(c * 31 + r, prompt_tokens), "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, **extra}
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        async def client_loop(c: int) -> list[int]:
            return [await one(c, r, lengths[(c, r)] if lengths else new_tokens) for r in range(requests_per_client)]

        await one(999, 0, 4)  # the grammar compiled, connections warm
        start = time.perf_counter()
        counts = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        wall = time.perf_counter() - start
    generated = {(c, r): n for c, row in enumerate(counts) for r, n in enumerate(row)}
    return sum(generated.values()) / wall, generated


Load = tuple[int, dict, str | None]  # clients, extra body fields, the load whose lengths it asks for


def bench_plain_loads(name: str, args: argparse.Namespace, workdir: Path, loads: dict[str, Load]
                      ) -> dict[str, list[tuple[float, float]]]:
    """Each named load's (generated tokens/s, server CPU ms per generated token) in each of
    --repeats rounds on one server of ours, the loads alternating within a round. A load naming
    another (earlier) one asks for the lengths that one's requests generated in its first round."""
    config = MODELS[name]()
    torch.manual_seed(args.seed)
    save_pretrained(build_transformer(config), checkpoint := workdir / name, tokenizer=ByteTokenizer())
    threads = ["--threads", str(args.threads)] if args.threads else []
    ours = Process([sys.executable, "-m", "andromeda", "serve", "--checkpoint", str(checkpoint), "--port",
                    str(port := free_port()), "--max-batch-size", str(max(args.clients)), *threads], port,
                   workdir / f"{name}-plain.log")
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in loads}
    lengths: dict[str, dict[tuple[int, int], int]] = {}
    try:
        ours.wait_ready()
        for _ in range(args.repeats):
            for label, (clients, extra, like) in loads.items():
                cpu = ours.cpu_seconds()
                tok_s, generated = asyncio.run(constrained_load(ours.url, clients, args.requests, args.prompt_tokens,
                                                                args.new_tokens, extra, like and lengths[like]))
                cpu_ms = (ours.cpu_seconds() - cpu) / sum(generated.values()) * 1e3  # (the warm-up request's too)
                lengths.setdefault(label, generated)
                runs[label].append((tok_s, cpu_ms))
                log.info("%s %s: %.1f tok/s, %.3f CPU ms/token", name, label, tok_s, cpu_ms)
    finally:
        ours.stop()
    return runs


def bench_constrained(name: str, args: argparse.Namespace, workdir: Path) -> list[list[object]]:
    """Free text, then each constraint followed by free text of its requests' lengths: a grammar
    that ends a request early (an untrained model reaches the end of a JSON object in ~12 tokens)
    leaves more of the load to per-request work (HTTP, admission, prefill), which the plain ratio
    counts against the grammar and the equal-lengths one does not. Ratios are the median of each
    round's (its loads ran back to back, under the same outside load)."""
    clients = max(args.clients)
    loads: dict[str, Load] = {"free text": (clients, {}, None)}
    for label, extra in CONSTRAINTS.items():
        if extra:
            loads[label] = (clients, extra, None)
            loads[f"free text, {label}'s lengths"] = (clients, {}, label)
    runs = bench_plain_loads(name, args, workdir, loads)

    def ratio(label: str, peer: str) -> str:
        return f"{statistics.median(a[0] / b[0] for a, b in zip(runs[label], runs[peer])):.2f}x"

    def median(label: str, field: int) -> float:
        return statistics.median(run[field] for run in runs[label])

    rows = [[name, "free text", clients, f"{median('free text', 0):.0f}", "", "", f"{median('free text', 1):.3f}", ""]]
    for label in loads:
        if label in CONSTRAINTS and label != "free text":
            same = f"free text, {label}'s lengths"
            rows.append([name, label, clients, f"{median(label, 0):.0f}", ratio(label, "free text"), ratio(label, same),
                         f"{median(label, 1):.3f}", f"{median(same, 1):.3f}"])
    return rows


def bench_engine_constrained(name: str, args: argparse.Namespace) -> list[list[object]]:
    """The grammar's own cost without HTTP or a load generator: an EngineCore in this process
    runs C sequences (the loads' prompts and constraints, greedy) to their end, each constraint
    followed by free text of the same lengths, over --repeats rounds; per-round ratios of
    generated tokens/s."""
    from andromeda.inference.sampling import SamplingParams
    from andromeda.inference.structured import grammar_matcher
    from andromeda.serve.config import ServeConfig
    from andromeda.serve.core import EngineCore
    from andromeda.serve.protocol import CompletionRequest
    from andromeda.serve.scheduler import Sequence

    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))  # as `andromeda serve` does
    torch.manual_seed(args.seed)
    clients, tokenizer = max(args.clients), ByteTokenizer()
    core = EngineCore(build_transformer(MODELS[name]()).eval(), ServeConfig(max_batch_size=clients))

    def run(constraint, lengths: list[int] | None) -> tuple[float, list[int]]:
        seqs = [Sequence([tokenizer.eos_id, *tokenizer.encode(prompt_text(c * 31, args.prompt_tokens))],
                         lengths[c] if lengths else args.new_tokens, SamplingParams(0),
                         matcher=constraint and grammar_matcher(constraint, tokenizer)) for c in range(clients)]
        start = time.perf_counter()
        for seq in seqs:
            core.add(seq)
        while core.has_work:
            core.step()
        generated = [len(seq.output) for seq in seqs]
        return sum(generated) / (time.perf_counter() - start), generated

    rows = []
    for label, extra in CONSTRAINTS.items():
        if not extra:
            continue
        constraint = CompletionRequest(model="m", prompt="p", **extra).output_constraint()[0]
        _, lengths = run(constraint, None)  # the grammar compiled, the lengths known
        ratios, tok_s = [], []
        for _ in range(args.repeats):
            tok_s.append(run(constraint, None)[0])
            ratios.append(tok_s[-1] / run(None, lengths)[0])
        rows.append([name, label, clients, sum(lengths), f"{statistics.median(tok_s):.0f}",
                     f"{statistics.median(ratios):.2f}x"])
    return rows


def bench_plain(name: str, args: argparse.Namespace, workdir: Path) -> list[list[object]]:
    clients = sorted(args.clients)
    runs = bench_plain_loads(name, args, workdir, {str(c): (c, {}, None) for c in clients})
    tok_s = {label: statistics.median(run[0] for run in r) for label, r in runs.items()}
    single = tok_s[str(clients[0])]
    return [[name, c, f"{tok_s[str(c)]:.0f}", f"{tok_s[str(c)] / single:.2f}x"] for c in clients]


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# ----------------------------------------------------------------------------- servers


class Process:
    def __init__(self, command: list[str], port: int, log_file: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        with open(log_file, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_file.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log_file.read_text()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[list[object]]:
    config = MODELS[name]()
    torch.manual_seed(args.seed)
    net = build_transformer(config)
    checkpoint = workdir / name
    save_pretrained(net, checkpoint, tokenizer=ByteTokenizer())
    params = net.num_parameters()
    del net
    threads = ["--threads", str(args.threads)] if args.threads else []
    env_python = sys.executable
    ours = Process([env_python, "-m", "andromeda", "serve", "--checkpoint", str(checkpoint), "--port",
                    str(port_a := free_port()), "--max-batch-size", str(max(args.clients)), *threads], port_a,
                   workdir / f"{name}-ours.log")
    base = Process([env_python, os.path.abspath(__file__), "--baseline-server", str(checkpoint), "--port",
                    str(port_b := free_port()), *threads], port_b, workdir / f"{name}-baseline.log")
    try:
        ours.wait_ready()
        base.wait_ready()
        servers = {"andromeda serve": ours, "baseline (generate, one at a time)": base}
        runs: dict[tuple[str, int], list[dict]] = {}
        for repeat in range(args.repeats):
            for clients in args.clients:
                for label, server in servers.items():
                    cpu = server.cpu_seconds()
                    result = asyncio.run(load(server.url, clients, args.requests, args.prompt_tokens,
                                              args.new_tokens))
                    tokens = clients * args.requests * args.new_tokens
                    result["cpu_ms"] = (server.cpu_seconds() - cpu) / tokens * 1e3
                    runs.setdefault((label, clients), []).append(result)
                    log.info("%s %s C=%d: %.1f tok/s, TTFT p50 %.0f ms", name, label, clients, result["tok_s"],
                             percentile(result["ttft"], 0.5) * 1e3)
    finally:
        ours.stop()
        base.stop()
    rows = []
    for label in servers:
        single = None
        for clients in args.clients:
            results = runs[(label, clients)]
            tok_s = statistics.median(r["tok_s"] for r in results)
            p50 = statistics.median(percentile(r["ttft"], 0.5) for r in results)
            p99 = statistics.median(percentile(r["ttft"], 0.99) for r in results)
            cpu_ms = statistics.median(r["cpu_ms"] for r in results)
            if single is None:
                single = (tok_s, p50)
            rows.append([f"{name} ({params / 1e6:.1f} M)", label, clients, f"{tok_s:.0f}",
                         f"{tok_s / single[0]:.1f}x", f"{p50 * 1e3:.0f}", f"{p99 * 1e3:.0f}",
                         f"{p50 / single[1]:.1f}x", f"{cpu_ms:.2f}"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo", "512x8"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads of each server (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="demo model only, one request per client, 1 repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--plain", action="store_true",
                        help="our server only: plain (non-streamed) requests at each --clients, vs the smallest")
    parser.add_argument("--constrained", action="store_true",
                        help="our server only, at the largest --clients: free text vs a regex vs a JSON schema")
    parser.add_argument("--engine", action="store_true",
                        help="with --constrained: an EngineCore in this process instead of a server (no HTTP)")
    parser.add_argument("--baseline-server", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.requests, args.repeats = ["demo"], 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_server:
        baseline_server(args.baseline_server, args.port, args.threads)
        return 0
    common.setup_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print(f"- machine: {common.environment()}; each server: "
          f"{args.threads or 'its default number of'} torch thread(s)")
    print(f"- load: C clients x {args.requests} streamed requests each, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, greedy; median of {args.repeats} runs; andromeda serve with "
          f"--max-batch-size {max(args.clients)}")
    rows = []
    if args.plain:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
            for name in args.models:
                rows += bench_plain(name, args, Path(workdir))
        print(common.markdown_table(["model", "clients", "tok/s", f"vs {min(args.clients)} client(s)"], rows))
        return 0
    if args.constrained and args.engine:
        for name in args.models:
            rows += bench_engine_constrained(name, args)
        print(common.markdown_table(["model", "output", "sequences", "tokens", "tok/s", "vs free text of equal lengths"],
                                    rows))
        return 0
    if args.constrained:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
            for name in args.models:
                rows += bench_constrained(name, args, Path(workdir))
        print(common.markdown_table(["model", "output", "clients", "tok/s", "vs free text", "vs free text of equal lengths",
                                     "server CPU ms/token", "free text's, equal lengths"], rows))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        for name in args.models:
            rows += bench_model(name, args, Path(workdir))
    print()
    print(common.markdown_table(["model", "server", "clients", "tok/s", "vs 1 client", "TTFT p50 ms",
                                 "TTFT p99 ms", "p50 vs 1 client", "server CPU ms/token"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

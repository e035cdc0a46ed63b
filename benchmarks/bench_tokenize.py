"""Tokenising a corpus: MB/s end to end of `andromeda.data.tokenize_corpus` (reading the files,
encoding in worker processes, writing the per-file caches and the corpus array) against, in the
same run, a one-process encode loop and the tokenizers library's own `encode_batch` over the same
documents already in memory. Corpus: the Shakespeare training plays copied to >= 150 MB (each
copy of a play a .txt file, i.e. one document); tokenizers: bytes, and a 32k byte-level BPE
trained on Shakespeare with `train_bpe`. `--big` measures peak memory while tokenising a single
1.6 GB .txt file, in a fresh process per tokenizer.

The byte tokenizer always runs in the calling process (its ids are the input bytes: the work is
reading and writing), so it has one tokenize_corpus row. On a machine shared with
other work, wall-clock ratios swing with the load; the CPU-seconds column (this process's
threads plus its worker processes) shows the work each contestant did.

    python benchmarks/bench_tokenize.py                  # 150 MB, byte and 32k BPE, all CPUs
    python benchmarks/bench_tokenize.py --quick          # 20 MB: a smoke test
    python benchmarks/bench_tokenize.py --big            # peak RSS on one 1.6 GB .txt file
    python benchmarks/bench_tokenize.py --num-proc 4 --mb 500 --tokenizers bpe
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import common
from andromeda.data import iter_texts, resolve_data, shakespeare_corpus, tokenize_corpus
from andromeda.data.store import default_num_proc
from andromeda.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, train_bpe

log = logging.getLogger("bench_tokenize")

MB = 1e6
BATCH_DOCUMENTS = 64  # documents per encode_batch call: all cores busy, bounded memory


def build_corpus(directory: Path, megabytes: float) -> list[Path]:
    """Copies of the Shakespeare training plays, `copy_000/<play>.txt`, ..., >= `megabytes`."""
    plays = resolve_data([shakespeare_corpus() / "train"])
    size = sum(p.stat().st_size for p in plays)
    for copy in range(math.ceil(megabytes * MB / size)):
        folder = directory / f"copy_{copy:03d}"
        folder.mkdir(parents=True)
        for play in plays:
            shutil.copyfile(play, folder / play.name)
    return resolve_data([directory])


def build_big_file(path: Path, megabytes: float) -> Path:
    """One .txt file of the training plays repeated to >= `megabytes`."""
    text = "".join(iter_texts(resolve_data([shakespeare_corpus() / "train"]))).encode()
    with open(path, "wb") as out:
        for _ in range(math.ceil(megabytes * MB / len(text))):
            out.write(text)
    return path


def make_tokenizer(name: str, workdir: Path, vocab_size: int) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    path = workdir / f"bpe{vocab_size}.json"
    if not path.is_file():
        log.info("training a %d-token BPE on Shakespeare", vocab_size)
        train_bpe(iter_texts(resolve_data([shakespeare_corpus() / "train"])),
                  vocab_size=vocab_size).save(workdir / "bpe")
        shutil.copyfile(workdir / "bpe" / "tokenizer.json", path)
    return HFTokenizer.from_file(path, name=f"bpe{vocab_size // 1000}k")


def contestants(tokenizer: Tokenizer, files: list[Path], documents: list[str], cache: Path,
                num_proc: int) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    def loop() -> None:  # what TokenStore did before: one process, one document at a time
        for document in documents:
            np.asarray(tokenizer.encode(document), dtype=np.int64).astype(dtype).tobytes()

    def ours(n: int):
        def run() -> None:  # into an empty cache folder: measure() empties it after each run
            tokenize_corpus(files, tokenizer, cache, num_proc=n, progress=False)
        return run

    runs = {"one-process encode loop (in memory)": loop}
    if isinstance(tokenizer, HFTokenizer):
        library = tokenizer._tokenizer

        def batch(method: str):
            encode = getattr(library, method)

            def run() -> None:
                for i in range(0, len(documents), BATCH_DOCUMENTS):
                    for e in encode(documents[i : i + BATCH_DOCUMENTS], add_special_tokens=False):
                        np.asarray(e.ids, dtype=dtype).tobytes()
            return run

        runs["tokenizers encode_batch, all cores (in memory)"] = batch("encode_batch")
        if hasattr(library, "encode_batch_fast"):
            runs["tokenizers encode_batch_fast, all cores (in memory)"] = batch("encode_batch_fast")
    if isinstance(tokenizer, HFTokenizer):
        runs["tokenize_corpus, num_proc=1 (files to cache)"] = ours(1)
        runs[f"tokenize_corpus, num_proc={num_proc} (files to cache)"] = ours(num_proc)
    else:  # bytes always run in the calling process
        runs["tokenize_corpus (files to cache)"] = ours(num_proc)
    return runs


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its waited-for children."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(runs: dict, repeats: int, cache: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each run, interleaved A, B, C, A, B, C, ...; the `cache` folder is
    deleted after each run, outside the timing."""
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    for repeat in range(repeats):
        for label, run in runs.items():
            started, used = time.perf_counter(), cpu_seconds()
            run()
            wall[label].append(time.perf_counter() - started)
            cpu[label].append(cpu_seconds() - used)
            shutil.rmtree(cache, ignore_errors=True)
            log.info("run %d/%d %s: %.2f s (%.2f CPU s)", repeat + 1, repeats, label,
                     wall[label][-1], cpu[label][-1])
    return wall, cpu


def throughput(args: argparse.Namespace, workdir: Path) -> None:
    files = build_corpus(workdir / "corpus", args.mb)
    documents = list(iter_texts(files))
    megabytes = sum(len(d.encode()) for d in documents) / MB
    print("## Tokenising a corpus (`benchmarks/bench_tokenize.py`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- corpus: {len(files)} .txt files (Shakespeare's training plays, copied), "
          f"{megabytes:,.1f} MB; tokenize_corpus with num_proc={args.num_proc}; "
          f"median of {args.repeats} interleaved run(s); load average at the start "
          f"{os.getloadavg()[0]:.1f}")
    print()
    rows = []
    for name in args.tokenizers:
        tokenizer = make_tokenizer(name, workdir, args.vocab)
        runs = contestants(tokenizer, files, documents, workdir / "cache", args.num_proc)
        times, cpu = measure(runs, args.repeats, workdir / "cache")
        seconds = {label: common.median(t) for label, t in times.items()}
        loop = seconds["one-process encode loop (in memory)"]
        batch = seconds.get("tokenizers encode_batch, all cores (in memory)")
        for label, s in seconds.items():
            rows.append([f"{tokenizer.name} ({tokenizer.vocab_size:,})", label, f"{s:.1f}",
                         f"{megabytes / s:.1f}", f"{loop / s:.2f}x",
                         f"{batch / s:.2f}x" if batch else "-",
                         f"{common.median(cpu[label]):.1f}"])
    print(common.markdown_table(["tokenizer", "contestant", "seconds", "MB/s", "vs loop",
                                 "vs encode_batch", "CPU seconds"], rows))
    print(f"\nCPU seconds: user + system time of this process's threads and its worker "
          f"processes; load average at the end {os.getloadavg()[0]:.1f}.")
    shutil.rmtree(workdir / "cache", ignore_errors=True)


def big_child(args: argparse.Namespace) -> None:
    """In this fresh process: tokenise one big file; report the time as JSON."""
    tokenizer = make_tokenizer(args.tokenizers[0], Path(args.workdir), args.vocab)
    started = time.perf_counter()
    stats = tokenize_corpus([Path(args.big_file)], tokenizer, Path(args.workdir) / "cache",
                            num_proc=args.num_proc, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps(dict(tokenizer=tokenizer.name, seconds=seconds, bytes=stats.bytes,
                          tokens=stats.tokens, processes=stats.processes)))


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            for task in Path(f"/proc/{parent}/task").iterdir():
                children = (task / "children").read_text().split()
                found += map(int, children)
                stack += map(int, children)
        except OSError:
            continue
    return found


def run_watched(command: list[str], poll_s: float = 0.05) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `command`, sampling the resident memory of it and its descendants (the tokenizer
    workers): the largest sum seen at one time, and each process's own peak (VmHWM)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    total = [0]

    def watch() -> None:
        while process.poll() is None:
            now = 0
            for pid in [process.pid, *_descendants(process.pid)]:
                try:
                    now += common.rss_bytes(pid)
                    peaks[pid] = max(peaks.get(pid, 0), common._status_field("VmHWM", pid))
                except (OSError, KeyError):
                    pass
            total[0] = max(total[0], now)
            time.sleep(poll_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    watcher.join()
    main = peaks.pop(process.pid, 0)
    return (subprocess.CompletedProcess(command, process.returncode, stdout, stderr),
            dict(total=total[0], main=main, worker=max(peaks.values(), default=0)))


def big(args: argparse.Namespace, workdir: Path) -> None:
    path = build_big_file(workdir / "big.txt", args.big_mb)
    print("## Peak memory tokenising one large .txt file (`benchmarks/bench_tokenize.py --big`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- one .txt file of {path.stat().st_size / MB:,.0f} MB (the Shakespeare training plays "
          f"repeated); tokenize_corpus with num_proc={args.num_proc}, each tokenizer in a fresh "
          f"process; resident memory sampled every 50 ms over the process and its workers; load "
          f"average at the start {os.getloadavg()[0]:.1f}")
    print()
    rows = []
    for name in args.tokenizers:
        make_tokenizer(name, workdir, args.vocab)  # train outside the measured process
        command = common.child_command(
            __file__, "--big-child", "--big-file", str(path), "--workdir", str(workdir),
            "--tokenizers", name, "--vocab", str(args.vocab), "--num-proc", str(args.num_proc))
        run, memory = run_watched(command)
        shutil.rmtree(workdir / "cache", ignore_errors=True)
        result = common.CappedRun(run.returncode, run.stdout, run.stderr, None, 0).last_json()
        if result is None:
            rows.append([name, f"failed: {run.stderr.strip()[-300:]}", "", "", "", ""])
            continue
        rows.append([result["tokenizer"], f"{result['seconds']:.0f}",
                     f"{result['bytes'] / MB / result['seconds']:.1f}",
                     common.format_bytes(memory["total"]),
                     common.format_bytes(memory["main"]),
                     common.format_bytes(memory["worker"]) if memory["worker"] else "(no workers)"])
    print(common.markdown_table(
        ["tokenizer", "seconds", "MB/s", "peak RSS, all processes", "peak RSS, main process",
         "peak RSS, largest worker"], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=150.0, help="corpus size for the throughput table")
    parser.add_argument("--quick", action="store_true", help="a 20 MB corpus")
    parser.add_argument("--big", action="store_true", help="peak RSS on one large .txt file instead")
    parser.add_argument("--big-mb", type=float, default=1600.0)
    parser.add_argument("--tokenizers", nargs="+", choices=["byte", "bpe"], default=["byte", "bpe"])
    parser.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary size")
    parser.add_argument("--num-proc", type=int, default=default_num_proc())
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", help="where corpora and caches go (default: a temporary folder, "
                                          "deleted at the end)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--big-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--big-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.mb = 20.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.big_child:
        big_child(args)
        return 0
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_tokenize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        (big if args.big else throughput)(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

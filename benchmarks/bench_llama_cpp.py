"""Decoding against llama.cpp on the same CPU, in one sitting (issue #25).

llama.cpp is the reference for batch-1 CPU decoding: what a bandwidth-bound decoder reaches on
this machine. This script builds a Llama-architecture GGUF of the same size as our model, with
random weights (the `gguf` package; llama.cpp's speed does not depend on the values), and runs
llama.cpp's `llama-bench` on it; right after, in a fresh process, our model decodes with the
matching weight scheme, then that process measures its read bandwidth (a 2-thread probe,
`bench_decode.read_bandwidth`: best of 5 float32 sums of a multi-GiB tensor). One table:

    scheme               llama.cpp   ours
    bf16                 BF16        bf16 as `generate` decodes it: read by the rows kernel
                                     (`andromeda.inference.bf16_linear`) where it beats oneDNN (CPUs
                                     without AMX; with --compile wherever it runs), else prepacked for
                                     oneDNN (`andromeda.inference.packed`)
    int8                 Q8_0        int8, one scale per row (`andromeda.inference.quantize`)
    int4                 Q4_0        int4, group 128

Both sides decode `--new-tokens` tokens from a (nearly) empty context per run (llama-bench
`-p 0 -n 64`; ours from a 1-token prompt) and report the median run's tokens/s with the range:
on a shared machine one preempted run skews a mean. Every 2-D weight of the GGUF is in the
scheme's type (the output layer too, as our schemes quantize the logits; llama-quantize would
keep it in Q6_K). Bytes per token are the weights a
decode step reads: all but the embedding table, of which it reads one row. Effective GB/s is
bytes per token x tok/s, and "of probe" divides it by the probe of the same minute (the probe
swings by 2x within minutes on a shared VM: a fraction is only meaningful next to its peer).
"per byte" is ours / llama.cpp in tokens/s per byte read, i.e. the ratio of effective GB/s
(issue #25's goal: >= 1). `--rounds N` alternates the two sides N times per scheme (llama.cpp,
ours, llama.cpp, ours, ...) and reports each round's ratio and their median, the medians of all
runs and probes in the other columns: on this VM one round's ratio swings by +-10%.

The shape: our `Config()` default (hidden 2560, 32 layers, 24 query / 2 kv heads of 128,
vocabulary 50432) has a GELU MLP 4x wide; the Llama model gets the SwiGLU width, a multiple of
32 (the Q8_0/Q4_0 block), whose bf16 weight bytes per token are closest to ours (both printed).
`--small` is hidden 512, 4 layers (it fits in a big L3 cache: it measures the cache, not DRAM).

llama.cpp is built once from the source vendored in the `llama-cpp-python` 0.3.36 sdist
(downloaded with pip) with cmake, `-DGGML_NATIVE=ON` (-march=native), `llama-bench` only, at
`nice -n 19` and `--build-jobs` (default 1: the machine is shared; 24 min on 2 busy cores), into
`~/.cache/andromeda-bench/llama.cpp` ($ANDROMEDA_BENCH_CACHE), and reused by later runs;
`--llama-bench PATH` uses a local build instead. Where it cannot be built (no cmake or compiler,
no network, a failed build) the script says so and exits 0. Each GGUF is written to a temporary
folder (`--gguf-dir`; ~5 GB for the full bf16 model) and deleted after its run.

    python benchmarks/bench_llama_cpp.py --small          # a few minutes (plus the first build)
    python benchmarks/bench_llama_cpp.py                  # the 2.5 B shape: ~15-20 min, 5 GB disk, ~7 GB RAM
    python benchmarks/bench_llama_cpp.py --schemes int4 --llama-bench ~/llama.cpp/build/bin/llama-bench
    python benchmarks/bench_llama_cpp.py --compile        # ours int8/int4 through `generate --compile`'s step
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import bench_decode
import common
from andromeda import Config
from andromeda.inference.native import bf16_rows_kernel
from andromeda.inference.packed import rows_kernel_preferred
from andromeda.model import build_transformer

log = logging.getLogger("bench_llama_cpp")

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is built
GGUF_VERSION = "0.19.0"
BLOCK = 32  # Q8_0 and Q4_0 quantize blocks of 32 along a row
INIT_STD = 0.02


@dataclass(frozen=True)
class Scheme:
    name: str
    ggml_type: str  # gguf.GGMLQuantizationType member
    ours: str  # bench_decode's scheme


# bf16: as `generate` decodes it (`inference.packed.prepare_bf16`, `our_scheme`): the rows kernel where
# it beats oneDNN (or, compiled, wherever it runs), else prepacked for oneDNN.
SCHEMES = {s.name: s for s in (Scheme("bf16", "BF16", "bf16-rows"), Scheme("int8", "Q8_0", "int8"),
                               Scheme("int4", "Q4_0", "int4"))}


# ----------------------------------------------------------------------------- the shapes


def our_config(small: bool, layers: int | None) -> Config:
    config = Config.from_preset("default")
    if small:
        config = config.replace(dim=512, depth=4, heads=4, alibi_num_heads=2)
    return config.replace(depth=layers) if layers else config


def our_bf16_bytes(config: Config) -> int:
    """Bytes our bf16 decode step reads, counted on a model built on the meta device."""
    with torch.device("meta"):
        return bench_decode.streamed_bytes(build_transformer(config, dtype=torch.bfloat16))


def llama_tensors(config: Config, ff: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, PyTorch-order shape, role) of the Llama model; role "norm" tensors stay f32,
    the others take the scheme's type. Roles name the arrays that layers share."""
    q, kv = config.heads * config.dim_head, config.attn_kv_heads * config.dim_head
    tensors = [("token_embd.weight", (config.num_tokens, config.dim), "embedding")]
    for i in range(config.depth):
        tensors += [(f"blk.{i}.attn_norm.weight", (config.dim,), "norm"),
                    (f"blk.{i}.attn_q.weight", (q, config.dim), "q"),
                    (f"blk.{i}.attn_k.weight", (kv, config.dim), "kv"),
                    (f"blk.{i}.attn_v.weight", (kv, config.dim), "kv"),
                    (f"blk.{i}.attn_output.weight", (config.dim, q), "out"),
                    (f"blk.{i}.ffn_norm.weight", (config.dim,), "norm"),
                    (f"blk.{i}.ffn_gate.weight", (ff, config.dim), "up"),
                    (f"blk.{i}.ffn_up.weight", (ff, config.dim), "up"),
                    (f"blk.{i}.ffn_down.weight", (config.dim, ff), "down")]
    return tensors + [("output_norm.weight", (config.dim,), "norm"),
                      ("output.weight", (config.num_tokens, config.dim), "logits")]


def tensor_bytes(shape: tuple[int, ...], role: str, ggml_type: str) -> int:
    """Bytes of one GGUF tensor: norms in f32, the rest in `ggml_type` (bytes per block of 32)."""
    count = int(np.prod(shape))
    if role == "norm":
        return 4 * count
    per_block = {"BF16": 2 * BLOCK, "Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2}[ggml_type]
    return count // BLOCK * per_block


def llama_streamed_bytes(config: Config, ff: int, ggml_type: str) -> int:
    return sum(tensor_bytes(shape, role, ggml_type) for name, shape, role in llama_tensors(config, ff)
               if role != "embedding")


def swiglu_width(config: Config) -> int:
    """The SwiGLU width (a multiple of BLOCK) whose bf16 bytes per token are closest to ours."""
    target = our_bf16_bytes(config)
    guess = round(2 * config.ff_dim / 3 / BLOCK) * BLOCK  # 3 matrices of C x F against 2 of C x 4C
    candidates = range(max(BLOCK, guess - 8 * BLOCK), guess + 9 * BLOCK, BLOCK)
    return min(candidates, key=lambda ff: abs(llama_streamed_bytes(config, ff, "BF16") - target))


# ----------------------------------------------------------------------------- the GGUF


def write_gguf(path: Path, config: Config, ff: int, ggml_type: str, seed: int) -> None:
    """A Llama GGUF with N(0, 0.02) weights: one random array per role, which every layer
    shares (so writing takes seconds; each layer still has its own bytes in the file)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random llama, {config.depth} layers x {config.dim}")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.depth)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(config.heads)
    writer.add_head_count_kv(config.attn_kv_heads)
    writer.add_key_length(config.dim_head)
    writer.add_value_length(config.dim_head)
    writer.add_rope_dimension_count(config.dim_head)
    writer.add_rope_freq_base(config.rotary_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.num_tokens)
    writer.add_tokenizer_model("none")  # llama.cpp then makes vocab_size dummy tokens
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{ggml_type}"))
    arrays: dict[str, np.ndarray] = {}
    for name, shape, role in llama_tensors(config, ff):
        if role not in arrays:
            if role == "norm":
                arrays[role] = np.ones(shape, dtype=np.float32)
            else:
                weights = rng.standard_normal(shape, dtype=np.float32) * INIT_STD
                arrays[role] = gguf.quants.quantize(weights, qtype)  # (rows, bytes per row) uint8
        writer.add_tensor(name, arrays[role], raw_dtype=None if role == "norm" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- llama.cpp


def cache_dir() -> Path:
    root = os.environ.get("ANDROMEDA_BENCH_CACHE") or Path.home() / ".cache" / "andromeda-bench"
    return Path(root) / "llama.cpp"


def built_binary() -> Path:
    return cache_dir() / f"build-{LLAMA_CPP_PYTHON}" / "bin" / "llama-bench"


def llama_cpp_source() -> Path:
    """llama.cpp's source from the llama-cpp-python sdist (downloaded once with pip)."""
    source = cache_dir() / f"src-{LLAMA_CPP_PYTHON}"
    if (source / "CMakeLists.txt").is_file():
        return source
    sdist = cache_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        log.info("downloading the llama-cpp-python %s sdist", LLAMA_CPP_PYTHON)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "--no-deps", "--no-binary", ":all:", "-d", str(cache_dir())],
                       check=True, capture_output=True, text=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    partial = source.with_name(source.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix):]
                members.append(member)
        archive.extractall(partial, members=members, filter="data")
    partial.rename(source)
    return source


def build_llama_bench(jobs: int) -> tuple[Path, float]:
    """Build llama-bench (CPU backend, -march=native) at low priority: (binary, seconds)."""
    start = time.perf_counter()
    source, build = llama_cpp_source(), built_binary().parent.parent
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"]
    log_path = cache_dir() / "build.log"
    with open(log_path, "w") as out:
        for command in (configure, ["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)]):
            log.info("%s", " ".join(command))
            subprocess.run([*nice, *command], check=True, stdout=out, stderr=subprocess.STDOUT)
    return built_binary(), time.perf_counter() - start


def find_llama_bench(args: argparse.Namespace) -> tuple[Path | None, str]:
    """(the llama-bench to run, how it was found) or (None, why there is none)."""
    if args.llama_bench:
        path = Path(args.llama_bench).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"--llama-bench {args.llama_bench}: not an executable file; expected the path "
                             f"of a llama.cpp build's llama-bench (e.g. build/bin/llama-bench)")
        return path, "local build"
    if built_binary().is_file():
        return built_binary(), f"cached build of llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp"
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        return None, f"{' and '.join(missing)} not found"
    try:
        path, seconds = build_llama_bench(args.build_jobs)
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as error:
        detail = getattr(error, "stderr", None) or ""
        return None, f"the build failed ({error}; {detail.strip()[-500:]}; log: {cache_dir() / 'build.log'})"
    return path, f"built from llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp in {seconds / 60:.1f} min"


def run_llama_bench(binary: Path, gguf_path: Path, args: argparse.Namespace) -> dict:
    """llama-bench's decode-only test (-p 0): its JSON record (samples_ts: tok/s of each run)."""
    command = [str(binary), "-m", str(gguf_path), "-p", "0", "-n", str(args.new_tokens), "-t", str(args.threads),
               "-r", str(args.llama_repeats), "-o", "json"]
    log.info("%s", " ".join(command))
    run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    if run.returncode:
        raise RuntimeError(f"llama-bench exited with {run.returncode}: {run.stderr[-2000:]}")
    return json.loads(run.stdout)[0]


# ----------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace) -> dict:
    """One scheme of our model in this process (the child): decode, then the bandwidth probe."""
    scheme = SCHEMES[args.child]
    torch.manual_seed(args.seed)
    config = our_config(args.small, args.layers)
    ours = our_scheme(scheme, args.compile)
    net = bench_decode.convert(build_transformer(config, dtype=torch.bfloat16).eval(), ours)
    bench_decode.release_freed_memory()
    prompt = torch.randint(0, config.num_tokens, (1, 1), generator=torch.Generator().manual_seed(args.seed))
    device = torch.device("cpu")
    compiled = args.compile and ours != "bf16-packed"  # prepacked bf16 does not compile
    bench_decode.time_stream(net, prompt, 3, device, compiled)  # warm-up: kernels chosen (compiled), buffers
    runs = []  # tok/s of each run, as llama-bench counts them: tokens decoded / their time
    for _ in range(args.repeats):
        steps = bench_decode.time_stream(net, prompt, args.new_tokens, device, compiled)[1]
        runs.append(len(steps) / sum(steps))
    streamed = bench_decode.streamed_bytes(net)
    del net
    bench_decode.release_freed_memory()
    bandwidth = bench_decode.read_bandwidth(args.bandwidth_gib, device)
    return {"runs": runs, "streamed": streamed, "bandwidth": bandwidth, "compiled": compiled, "ours": ours}


def our_scheme(scheme: Scheme, compiled: bool) -> str:
    """bench_decode's scheme for ours, bf16 as `generate` decodes: compiled, by the rows kernel where it
    runs; eager, by it where it beats oneDNN (`rows_kernel_preferred`), else prepacked."""
    if scheme.ours == "bf16-rows" and not (bf16_rows_kernel() if compiled else rows_kernel_preferred()):
        return "bf16-packed"
    return scheme.ours


def ours_in_child(scheme: str, args: argparse.Namespace) -> dict:
    forwarded = ["--child", scheme, "--threads", str(args.threads), "--seed", str(args.seed),
                 "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
                 "--bandwidth-gib", str(args.bandwidth_gib)]
    forwarded += ["--small"] if args.small else []
    forwarded += ["--compile"] if args.compile else []
    forwarded += ["--layers", str(args.layers)] if args.layers else []
    run = common.run_capped(common.child_command(__file__, *forwarded), cap_bytes=int(args.max_rss_gb * 1e9),
                            timeout_s=args.timeout_s)
    result = run.last_json()
    if result is None:
        raise RuntimeError(f"ours ({scheme}) failed ({run.killed or f'exit code {run.returncode}'}): "
                           f"{run.stderr[-2000:]}")
    return result


# ----------------------------------------------------------------------------- the sitting


def compare(scheme: Scheme, binary: Path, config: Config, ff: int, args: argparse.Namespace) -> dict:
    """llama.cpp on its GGUF (written once), then ours in a fresh process, `--rounds` times."""
    if args.wait_idle:
        log.info("%s: machine %.0f%% idle", scheme.name, bench_decode.wait_until_idle(args.wait_idle))
    with tempfile.TemporaryDirectory(prefix="andromeda-gguf-", dir=args.gguf_dir) as folder:
        path = Path(folder) / f"llama-{scheme.ggml_type}.gguf"
        start = time.perf_counter()
        write_gguf(path, config, ff, scheme.ggml_type, args.seed)
        log.info("%s: wrote %s (%.2f GB) in %.0f s", scheme.name, path.name, path.stat().st_size / 1e9,
                 time.perf_counter() - start)
        rounds = []
        for _ in range(args.rounds):
            llama = run_llama_bench(binary, path, args)
            log.info("%s: llama.cpp %s tok/s; now ours", scheme.name, llama["samples_ts"])
            ours = ours_in_child(scheme.name, args)
            log.info("%s: ours %s tok/s, probe %.1f GB/s", scheme.name, ours["runs"], ours["bandwidth"] / 1e9)
            rounds.append((llama, ours))
    return {"scheme": scheme, "rounds": rounds, "llama_bytes": llama_streamed_bytes(config, ff, scheme.ggml_type)}


def spread(runs: list[float]) -> str:
    return f"({min(runs):.2f}–{max(runs):.2f})"


def per_byte(llama: dict, ours: dict, llama_bytes: int) -> float:
    """One round's ours / llama.cpp in tokens/s per byte read (medians of runs: one preempted
    run skews a mean)."""
    return common.median(ours["runs"]) * ours["streamed"] / (common.median(llama["samples_ts"]) * llama_bytes)


def table_row(result: dict) -> list[str]:
    scheme, rounds, llama_bytes = result["scheme"], result["rounds"], result["llama_bytes"]
    llama_runs = [run for llama, _ in rounds for run in llama["samples_ts"]]
    our_runs = [run for _, ours in rounds for run in ours["runs"]]
    streamed, compiled = rounds[0][1]["streamed"], rounds[0][1]["compiled"]
    llama_tok_s, ours_tok_s = common.median(llama_runs), common.median(our_runs)
    llama_rate, ours_rate = llama_tok_s * llama_bytes, ours_tok_s * streamed
    probe = common.median([ours["bandwidth"] for _, ours in rounds])
    ratios = [per_byte(llama, ours, llama_bytes) for llama, ours in rounds]
    name = rounds[0][1].get("ours", scheme.ours) + (", compiled" if compiled else "")
    return [f"{name} / {scheme.ggml_type}", f"{llama_tok_s:.2f} {spread(llama_runs)}",
            f"{ours_tok_s:.2f} {spread(our_runs)}", f"{llama_bytes / 1e9:.3f}", f"{streamed / 1e9:.3f}",
            f"{llama_rate / 1e9:.1f}", f"{ours_rate / 1e9:.1f}", f"{probe / 1e9:.1f}",
            f"{llama_rate / probe:.0%}", f"{ours_rate / probe:.0%}", ", ".join(f"{r:.2f}" for r in ratios),
            f"**{common.median(ratios):.2f}x**"]


def describe_shapes(config: Config, ff: int) -> None:
    ours, llama = our_bf16_bytes(config), llama_streamed_bytes(config, ff, "BF16")
    print(f"- shape: hidden {config.dim}, {config.depth} layers, {config.heads} query / {config.attn_kv_heads} "
          f"kv heads of {config.dim_head}, vocabulary {config.num_tokens}; ours GELU MLP {config.ff_dim}, "
          f"llama.cpp SwiGLU {ff}")
    print(f"- bf16 weight bytes read per token: ours {ours / 1e9:.4f} GB, llama {llama / 1e9:.4f} GB "
          f"({llama / ours - 1:+.2%})")


def bench(args: argparse.Namespace) -> int:
    print(f"- machine: {common.environment()}")
    try:
        import gguf  # noqa: F401 (the GGUF writer; checked before a long build)
    except ModuleNotFoundError:
        print(f"- skipped: the `gguf` package is missing (pip install gguf=={GGUF_VERSION})")
        return 0
    binary, found = find_llama_bench(args)
    if binary is None:
        print(f"- skipped: llama.cpp's llama-bench is unavailable: {found}")
        return 0
    print(f"- llama-bench: {binary} ({found})")
    config = our_config(args.small, args.layers)
    ff = swiglu_width(config)
    describe_shapes(config, ff)
    print(f"- batch 1, {args.threads} threads, {args.new_tokens} tokens decoded from an empty context "
          f"(llama-bench -p 0 -n {args.new_tokens}, {args.llama_repeats} runs; ours: a 1-token prompt, "
          f"{args.repeats} runs), {args.rounds} round(s) alternating; tok/s: the median run (range); "
          f"probe: our process's read bandwidth right after")
    rows = []
    for name in args.schemes.split(","):
        result = compare(SCHEMES[name], binary, config, ff, args)
        rows.append(table_row(result))
    print()
    print(common.markdown_table(
        ["scheme (ours / llama.cpp)", "llama.cpp tok/s (range)", "ours tok/s (range)", "llama.cpp GB/token", "ours GB/token",
         "llama.cpp GB/s", "ours GB/s", "probe GB/s", "llama.cpp of probe", "ours of probe",
         "per byte, each round", "ours / llama.cpp per byte (median)"], rows))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="hidden 512, 4 layers (a check of the setup)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers of the shape")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated subset of {', '.join(SCHEMES)}")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="a local llama.cpp build's llama-bench (default: build one into the cache)")
    parser.add_argument("--build-jobs", type=int, default=1, help="parallel jobs of the llama.cpp build")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both sides")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=3, help="our decoding runs per scheme and round")
    parser.add_argument("--rounds", type=int, default=1, help="llama.cpp then ours, this many times per scheme")
    parser.add_argument("--llama-repeats", type=int, default=5, help="llama-bench's runs per scheme (-r)")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0, help="size of the bandwidth probe")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each scheme wait until the CPUs are this %% idle (0: don't wait)")
    parser.add_argument("--gguf-dir", default=None, help="where the temporary GGUFs go (default: the system's temp)")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="kill our process past this RSS")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit on each run of either side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="ours decodes through generate(compile=True)'s compiled step (int8, int4)")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--child", choices=SCHEMES, help=argparse.SUPPRESS)  # our side of one scheme
    args = parser.parse_args(argv)
    unknown = [s for s in args.schemes.split(",") if s not in SCHEMES]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; choose from {', '.join(SCHEMES)}")
    for name in ("threads", "new_tokens", "repeats", "rounds", "llama_repeats", "build_jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_ours(args)))
        return 0
    return bench(args)


if __name__ == "__main__":
    raise SystemExit(main())

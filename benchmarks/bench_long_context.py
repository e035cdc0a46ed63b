"""How far does it read? Byte-level models trained short, evaluated long (README section).

Four position variants of the `demo` preset (dim 192, depth 4, 6 heads of 32, 2 kv heads), each
trained at 128 and at 512 tokens on Shakespeare's training plays with the same token budget
(steps x batch x seq_len), all with max_seq_len = the training length:

    seed mix         ALiBi on half the heads (3 of 6) + rotary xPos on all (the seed's Andromeda)
    xPos only        rotary xPos on all heads, no ALiBi
    ALiBi all heads  ALiBi on all 6 heads, no rotary
    learned absolute learned absolute positions only (these end at max_seq_len)

(1) Bits per byte on the held-out plays (Macbeth, The Tempest, Twelfth Night) at evaluation
    lengths 64 .. 16,384. Every length scores the same tokens: four stretches of 16,385 tokens
    spread over the held-out text, cut into windows of the length, each window read cold (as
    `andromeda eval` does), so a longer window gives each prediction more context, if the model
    can use it. Learned absolute positions are evaluated up to their max_seq_len only. The goal
    for the seed mix (ALiBi's published behaviour, Press et al. 2022): bits/byte at 16x the
    training length within 2% of bits/byte at the training length.
(2) Passkey retrieval (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300): a number
    hidden at a random depth of filler text ("The grass is green. The sky is blue. ..."), then
    "What is the pass key? The pass key is"; each variant is trained from scratch on 20,000
    examples of 128..248 tokens (loss on the answer only) and asked at 1x .. 16x 256 tokens;
    greedy answer, exact match. The number has one digit: with the paper's five, the seed mix
    did not learn even the training length (0 of 20 at 1x after 400 steps; the answer's loss
    still at chance after 1,000): the second and later digits need an induction circuit, the
    first only a lookup. So the probe measures whether attention finds one token past the
    training length, not the skill of copying a long number.

Models are trained with `andromeda.train.train` (bf16 autocast and the demo's hyperparameters,
but the fused attention path, the same function as the demo's explicit one and faster here at
both lengths), evaluated in fp32. Runs are kept in --out and reused when the script is run again
(delete them to retrain).

    python benchmarks/bench_long_context.py --quick                # smoke run, a few minutes
    python benchmarks/bench_long_context.py --out /work/scratch/long_context/run \\
        --plot docs/long_context.png                                # ~1-1.5 h on 2 busy cores

Prints markdown (setting, tables, the goal's verdict); writes results.json and report.md to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: the cores are shared

import numpy as np  # noqa: E402
import torch  # noqa: E402

from andromeda.checkpoint import latest_checkpoint, load_transformer  # noqa: E402
from andromeda.data import TokenStore, cache_root, resolve_data, shakespeare_corpus  # noqa: E402
from andromeda.evaluation import draw_bits_per_byte, evaluate  # noqa: E402
from andromeda.model import KVCache  # noqa: E402
from andromeda.tokenizers import ByteTokenizer  # noqa: E402
from andromeda.train import TrainConfig, train  # noqa: E402

log = logging.getLogger("bench_long_context")

VARIANTS = {
    "seed mix": {},
    "xPos only": {"alibi_pos_bias": False},
    "ALiBi all heads": {"alibi_num_heads": 6, "rotary_xpos": False},
    "learned absolute": {"use_abs_pos_emb": True, "alibi_pos_bias": False, "rotary_xpos": False},
}
TRAIN_LENGTHS = (128, 512)
EVAL_LENGTHS = tuple(2**k for k in range(6, 15))  # 64 .. 16384
TOKENS_PER_STEP = 2048  # batch 16 x 128, or 4 x 512
GOAL = 0.02  # bits/byte at 16x the training length within 2% of that at the training length

PASSKEY_TRAIN_LEN = 256
PASSKEY_DIGITS = 1
PASSKEY_FACTORS = (1, 2, 4, 8, 16)
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
QUESTION = " What is the pass key? The pass key is"


# ----------------------------------------------------------------------------- training


def train_run(job: dict) -> str:
    """Train one model (in a worker process) unless its run folder already holds the final step."""
    out = Path(job["out"])
    existing = latest_checkpoint(out) if out.exists() else None
    if existing is not None and existing.name == f"step_{job['steps']:06d}":
        return f"{out.name}: reused {existing}"
    if out.exists():  # an unfinished run: start it over
        import shutil

        shutil.rmtree(out)
    torch.set_num_threads(1)
    started = time.time()
    config = TrainConfig(
        out=str(out), preset="demo",
        model_overrides={"max_seq_len": job["seq_len"], "attn_flash": True, **job["overrides"]},
        data=job.get("data"), objective=job.get("objective", "lm"), seq_len=job["seq_len"],
        batch_size=job["batch_size"], max_steps=job["steps"], warmup_steps=min(50, job["steps"] // 5),
        lr=3e-3, qk_scale_lr_mult=30, bf16=True, eval_batches=0, save_every=job["steps"], log_every=50,
        keep=1, device="cpu", progress=False, seed=job.get("seed", 0))
    result = train(config)
    loss = "?" if result.train_loss is None else f"{result.train_loss:.3f}"
    return f"{out.name}: {result.step} steps in {time.time() - started:.0f}s, last train loss {loss}"


def run_jobs(jobs: list[dict], workers: int) -> None:
    if workers <= 1:
        for job in jobs:
            log.info(train_run(job))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for message in pool.map(train_run, jobs):
            log.info(message)


def load_for_eval(run: Path) -> torch.nn.Module:
    """The run's final model, fp32, eval mode."""
    return load_transformer(latest_checkpoint(run), device="cpu").eval()


# ----------------------------------------------------------------------------- (1) bits per byte


def heldout_segments(longest: int, count: int) -> tuple[list[np.ndarray], float]:
    """`count` stretches of longest + 1 tokens spread evenly over the held-out plays, and the
    bytes per token of the held-out text (1 for bytes, less the end-of-text separators)."""
    files = resolve_data([shakespeare_corpus() / "heldout"])
    store = TokenStore(files, ByteTokenizer(), cache_dir=cache_root() / "tokens")
    tokens = np.asarray(store.tokens)
    starts = np.linspace(0, len(tokens) - longest - 1, count).astype(int)
    return [tokens[s : s + longest + 1] for s in starts], store.num_bytes / len(store)


def bits_per_byte(net, segments: list[np.ndarray], seq_len: int, bytes_per_token: float) -> float:
    nats = scored = 0.0
    for segment in segments:
        result = evaluate(net, segment, seq_len, max(1, 16384 // seq_len), num_bytes=len(segment) - 1)
        nats += result["loss"] * result["tokens"]
        scored += result["tokens"]
    return nats / math.log(2) / (scored * bytes_per_token)


def eval_run(job: dict) -> dict:
    torch.set_num_threads(1)
    net = load_for_eval(Path(job["run"]))
    segments, bytes_per_token = heldout_segments(job["longest"], job["segments"])
    out = {}
    for n in job["lengths"]:
        started = time.time()
        with torch.no_grad():
            out[str(n)] = bits_per_byte(net, segments, n, bytes_per_token)
        log.info("%s at %d: %.4f bits/byte (%.0fs)", Path(job["run"]).name, n, out[str(n)], time.time() - started)
    return out


# ----------------------------------------------------------------------------- (2) passkey


def passkey_example(rng: random.Random, length: int) -> tuple[str, str]:
    """(prompt, answer) with the prompt about `length` bytes long: filler sentences around the
    pass key sentence at a random depth, then the question."""
    key = "".join(rng.choice("0123456789") for _ in range(PASSKEY_DIGITS))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    room = length - len(needle) - len(QUESTION)
    filler, size, i = [], 0, rng.randrange(len(FILLER))
    while size < room:
        sentence = " " + FILLER[i % len(FILLER)]
        filler.append(sentence)
        size += len(sentence)
        i += 1
    while filler and size > room:  # do not run past the length
        size -= len(filler.pop())
    depth = rng.randint(0, len(filler))
    prompt = "".join(filler[:depth]) + needle + "".join(filler[depth:]) + QUESTION
    return prompt.lstrip(), " " + key


def write_passkey_data(path: Path, examples: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(examples):
            # lengths from half the training length to all of it (the answer and eos must fit)
            prompt, answer = passkey_example(rng, rng.randint(PASSKEY_TRAIN_LEN // 2, PASSKEY_TRAIN_LEN - 8))
            f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")


@torch.no_grad()
def answer(net, tokenizer: ByteTokenizer, prompt: str, new: int) -> str:
    """Greedy continuation with a KV cache that holds everything (no window: the probe asks
    whether the model reads that far)."""
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
    cache = KVCache(net.config, 1, ids.shape[1] + new, dtype=torch.float32, device="cpu")
    logits = net(ids, cache=cache, logits_to_keep=1)[:, -1]
    out = []
    for _ in range(new):
        token = int(logits.argmax(-1))
        out.append(token)
        logits = net(torch.tensor([[token]]), cache=cache, logits_to_keep=1)[:, -1]
    return tokenizer.decode(out)


def passkey_eval(job: dict) -> dict:
    torch.set_num_threads(1)
    net = load_for_eval(Path(job["run"]))
    tokenizer = ByteTokenizer()
    out = {}
    for factor in job["factors"]:
        length = PASSKEY_TRAIN_LEN * factor
        if net.config.use_abs_pos_emb and length > net.config.max_seq_len:
            continue
        rng = random.Random(1000 + factor)
        hits = 0
        for _ in range(job["trials"]):
            prompt, key = passkey_example(rng, length - 8)
            hits += answer(net, tokenizer, prompt, len(key)) == key
        out[str(factor)] = hits / job["trials"]
        log.info("%s passkey at %dx: %d/%d", Path(job["run"]).name, factor, hits, job["trials"])
    return out


# ----------------------------------------------------------------------------- report


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def markdown(results: dict, args: argparse.Namespace) -> str:
    lengths = [n for n in EVAL_LENGTHS if n <= args.longest]
    lines = ["### Bits per byte on the held-out plays by evaluation length", "",
             "| variant | trained at | " + " | ".join(str(n) for n in lengths) + " | 16x / 1x |",
             "|---|---|" + "---|" * len(lengths) + "---|"]
    for name in VARIANTS:
        for trained in TRAIN_LENGTHS:
            row = results["bits_per_byte"].get(f"{slug(name)}-{trained}", {})
            cells = [f"**{row[str(n)]:.3f}**" if n == trained and str(n) in row else
                     (f"{row[str(n)]:.3f}" if str(n) in row else "—") for n in lengths]
            ratio = ratio_cell(row, trained)
            lines.append(f"| {name} | {trained} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "### Passkey retrieval accuracy (trained at 256 tokens)", "",
              "| variant | " + " | ".join(f"{f}x ({PASSKEY_TRAIN_LEN * f})" for f in args.factors) + " |",
              "|---|" + "---|" * len(args.factors)]
    for name in VARIANTS:
        row = results["passkey"].get(slug(name), {})
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[str(f)]:.0f}%" if str(f) in row else "—"
                                                  for f in args.factors) + " |")
    lines += ["", "### The goal: seed mix bits/byte at 16x the training length within 2% of 1x", ""]
    for trained in TRAIN_LENGTHS:
        for name in VARIANTS:
            row = results["bits_per_byte"].get(f"{slug(name)}-{trained}", {})
            change = relative_change(row, trained)
            if change is None:
                continue
            verdict = "meets" if change <= GOAL else "misses"
            lines.append(f"- {name}, trained at {trained}: {row[str(trained)]:.3f} -> {row[str(16 * trained)]:.3f} "
                         f"bits/byte at {16 * trained} ({100 * change:+.1f}%): {verdict} the 2% goal")
    return "\n".join(lines) + "\n"


def relative_change(row: dict, trained: int) -> float | None:
    if str(trained) not in row or str(16 * trained) not in row:
        return None
    return row[str(16 * trained)] / row[str(trained)] - 1


def ratio_cell(row: dict, trained: int) -> str:
    change = relative_change(row, trained)
    return "—" if change is None else f"{100 * change:+.1f}%"


def plot(results: dict, path: Path, args: argparse.Namespace) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3)
    for axes, trained in zip(panels, TRAIN_LENGTHS):
        curves = [{"label": name, "train_seq_len": trained,
                   "results": results["bits_per_byte"].get(f"{slug(name)}-{trained}", {})} for name in VARIANTS]
        draw_bits_per_byte(axes, [c for c in curves if c["results"]],
                           title=f"trained at {trained} tokens: held-out bits/byte")
        # Keep the relative-position variants readable; a curve far above them gets a note.
        relative = [v for c in curves if c["label"] != "learned absolute" for v in c["results"].values()]
        if relative:
            top = max(relative) + 0.4 * (max(relative) - min(relative)) + 0.02
            axes.set_ylim(min(relative) - 0.02, top)
            above = [c for c in curves if c["results"] and max(c["results"].values()) > top]
            for index, curve in enumerate(above):
                values = curve["results"].values()
                axes.annotate(f"{curve['label']}: {min(values):.2f}-{max(values):.2f}, above the axis",
                              (0.02, 0.96 - 0.06 * index), xycoords="axes fraction", fontsize=8, va="top")
    axes = panels[2]
    for name in VARIANTS:
        row = results["passkey"].get(slug(name), {})
        points = [(PASSKEY_TRAIN_LEN * int(f), 100 * v) for f, v in row.items()]
        if points:
            axes.plot(*zip(*sorted(points)), "o-", markersize=3, label=name)
    axes.set_xscale("log", base=2)
    ticks = [PASSKEY_TRAIN_LEN * f for f in args.factors]
    axes.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    axes.minorticks_off()
    axes.axvline(PASSKEY_TRAIN_LEN, color="grey", linestyle=":")
    axes.set_ylim(-5, 105)
    axes.set_xlabel("prompt length (tokens); dotted: training length")
    axes.set_ylabel("passkey accuracy (%)")
    axes.set_title(f"passkey retrieval, trained at {PASSKEY_TRAIN_LEN}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/work/scratch/long_context/run", help="runs, results.json, report.md")
    parser.add_argument("--plot", help="figure path (default: OUT/long_context.png)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per language model")
    parser.add_argument("--passkey-steps", type=int, default=300, help="optimizer steps per passkey model")
    parser.add_argument("--trials", type=int, default=40, help="passkey prompts per length")
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, lengths to 1024")
    parser.add_argument("--parts", nargs="+", choices=("lm", "passkey"), default=("lm", "passkey"),
                        help="what to train and measure (the report shows what results.json holds)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("andromeda").setLevel(logging.WARNING)
    out = Path(args.out if not args.quick else args.out.rstrip("/") + "-quick")
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.steps, args.passkey_steps, args.trials = 30, 30, 4
        args.longest, args.segments, args.factors = 1024, 2, (1, 2, 4)
    else:
        args.longest, args.segments, args.factors = EVAL_LENGTHS[-1], 4, PASSKEY_FACTORS
    started = time.time()

    # Train: 8 language models, 4 passkey models.
    passkey_data = out / "passkey_train.jsonl"
    jobs = []
    if "lm" in args.parts:
        jobs += [dict(out=str(out / f"lm-{slug(name)}-{n}"), overrides=o, seq_len=n,
                      batch_size=TOKENS_PER_STEP // n, steps=args.steps)
                 for n in TRAIN_LENGTHS for name, o in VARIANTS.items()]
    if "passkey" in args.parts:
        if not passkey_data.exists():
            write_passkey_data(passkey_data, 20000)
        jobs += [dict(out=str(out / f"passkey-{slug(name)}"), overrides=o, seq_len=PASSKEY_TRAIN_LEN,
                      batch_size=16, steps=args.passkey_steps, objective="completion", data=(str(passkey_data),))
                 for name, o in VARIANTS.items()]
    run_jobs(jobs, args.workers)
    trained_s = time.time() - started

    # Evaluate (keeping what an earlier run measured of the parts not asked for).
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    results.setdefault("bits_per_byte", {})
    results.setdefault("passkey", {})
    lengths = [n for n in EVAL_LENGTHS if n <= args.longest]
    eval_jobs, keys = [], []
    if "lm" in args.parts:
        for n in TRAIN_LENGTHS:
            for name, o in VARIANTS.items():
                usable = [m for m in lengths if not o.get("use_abs_pos_emb") or m <= n]
                eval_jobs.append(dict(run=str(out / f"lm-{slug(name)}-{n}"), lengths=usable, longest=args.longest,
                                      segments=args.segments))
                keys.append(f"{slug(name)}-{n}")
    passkey_jobs = [dict(run=str(out / f"passkey-{slug(name)}"), factors=args.factors, trials=args.trials)
                    for name in VARIANTS] if "passkey" in args.parts else []
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        bpb = pool.map(eval_run, eval_jobs)
        passkey = pool.map(passkey_eval, passkey_jobs)
        results["bits_per_byte"].update(zip(keys, bpb))
        results["passkey"].update(zip([slug(name) for name in VARIANTS], passkey))
    results["setting"] = dict(steps=args.steps, tokens_per_step=TOKENS_PER_STEP, passkey_steps=args.passkey_steps,
                              trials=args.trials, segments=args.segments, longest=args.longest,
                              machine=f"{cpu_name()}, {os.cpu_count()} cores",
                              torch=torch.__version__, minutes=round((time.time() - started) / 60, 1),
                              training_minutes=round(trained_s / 60, 1))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figure = Path(args.plot) if args.plot else out / "long_context.png"
    plot(results, figure, args)
    report = (f"## How far does it read? (bench_long_context.py{' --quick' if args.quick else ''})\n\n"
              f"demo preset (1.7 M parameters), byte-level, {args.steps} steps x {TOKENS_PER_STEP} tokens per "
              f"language model; passkey models {args.passkey_steps} steps x 16 x {PASSKEY_TRAIN_LEN}; "
              f"{args.segments} x {args.longest + 1} held-out tokens scored at every length; {args.trials} passkey "
              f"prompts per length. {results['setting']['machine']}, torch {torch.__version__}, "
              f"{results['setting']['minutes']} min.\n\n" + markdown(results, args) + f"\nFigure: {figure}\n")
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

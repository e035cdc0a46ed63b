"""LoRA and QLoRA fine-tuning (issue #23's goals): what the 2.5 B default needs to fine-tune on one
machine, and whether a LoRA fine-tune learns what a full one does.

(a) `memory`: `andromeda train --init-from BASE --lora-rank 16` on every attention and feed-forward
Linear of the 2.5 B default (`Config()`, random weights saved in bf16), `--bf16`, sequence 1,024,
batch 1, `--activation-checkpointing`, a few steps; then the same over an int8 base (QLoRA,
`--quantize int8`). Each run is its own process (the train command's parser and `train()`), which
reports as it exits its peak RSS (the kernel's exact high-water mark) over the whole run, and over
the steps after the first alone (the mark reset after step 1), which leaves the loading out; a
watchdog (common.run_capped) kills a run that passes --cap-gb or leaves the machine short of memory. Beside each: tokens/s (train metrics, steps after
the first) and `andromeda plan --lora-rank 16 [--quantize int8]`'s estimate (`plan.lora_plan`),
as a ratio to the measurement. Goals: LoRA <= 10 GB, QLoRA int8 <= 7 GB, the plan within 15%.

(b) `learning`: the demo preset, pretrained briefly here on Shakespeare, then fine-tuned with
`--objective chat` on conversations the script writes: a herald persona that answers every
question in one fixed form, echoing the question's keyword (keywords are words of the corpus; the
held-out conversations ask about keywords no training conversation has). Two runs with the same
steps and batches: a full fine-tune (lr 1e-3) and LoRA rank 4 on all four targets (lr 1e-2, the
usual higher LoRA rate). Reported: held-out loss on the assistant's tokens (the run's final
evaluation over every held-out conversation), the share of parameters trained, and how many
greedy held-out replies have the herald's form and how many are exactly right (the keyword echoed).
Goals: LoRA's held-out loss within 10% of the full fine-tune's, training <= 5% of the parameters.

    python benchmarks/bench_lora.py                   # both parts
    python benchmarks/bench_lora.py memory            # (a) only: ~16 GB free RAM, 5 GB disk, ~10 min on 2 cores
    python benchmarks/bench_lora.py learning          # (b) only: ~6 min on 2 cores
    python benchmarks/bench_lora.py --small           # quick check: dim 512 / depth 4 for (a), tiny preset for (b)

(a) writes the 5 GB base checkpoint into a temporary folder under --work-dir (default: the system's
temporary folder) and deletes it afterwards; never run it beside another multi-GB job (its runs
are killed past --cap-gb, or when the machine has under 1.5 GB left).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import common
from andromeda import Config

log = logging.getLogger("bench_lora")

GB = 1e9
PARTS = ("memory", "learning")
RANK_BIG = 16  # the rank for the 2.5 B default
GOALS_GB = {"LoRA (bf16 base)": 10.0, "QLoRA (int8 base)": 7.0, "QLoRA (int8 checkpoint)": 7.0}
# What each run starts from: --quantize on the bf16 base, or a checkpoint `andromeda quantize` wrote.
RUNS = {"LoRA (bf16 base)": (None, False), "QLoRA (int8 base)": ("int8", False), "QLoRA (int8 checkpoint)": (None, True)}
PLAN_TOLERANCE = 0.15
LEARNING_LOSS_TOLERANCE = 0.10
MAX_TRAINED_SHARE = 0.05

# Chat data: one system prompt, a few ways of asking, one fixed way of answering.
SYSTEM = "You are the herald."
QUESTIONS = ("Pray tell me of {k}.", "What dost thou know of {k}?", "I would hear about {k}.",
             "Speak to me of {k}, good herald.", "Hast thou news of {k}?", "Say something of {k}.")
REPLY = "Hear ye! The herald speaks of {k}: let {k} be proclaimed."
FOLLOW_UP = "And {k}?"
# Each turn as <role>content and a newline; a reply asked for opens with <assistant>.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


# ----------------------------------------------------------------------------- (a) memory


def memory_config(small: bool) -> Config:
    return Config(dim=512, depth=4) if small else Config()


def build_base(folder: Path, small: bool, seed: int) -> None:
    """In this (child) process: the model with random weights, built directly in bf16 (no fp32
    copy), saved as a checkpoint with the byte tokenizer."""
    from andromeda.checkpoint import save_pretrained
    from andromeda.model import build_transformer
    from andromeda.tokenizers import ByteTokenizer

    torch.manual_seed(seed)
    net = build_transformer(memory_config(small), dtype=torch.bfloat16)
    save_pretrained(net, folder, ByteTokenizer())


def train_in_child(train_args: list[str]) -> None:
    """In this (child) process: `andromeda train ARGS` (parsed and run as the command runs them),
    then as JSON its peak RSS over the whole run and over the steps after the first: the kernel's
    high-water mark is read and reset after step 1, so the second peak leaves out the loading."""
    from andromeda.cli import build_parser
    from andromeda.cli.train import train_config_from_args
    from andromeda.train import train

    marks: dict[str, int | bool] = {}

    def after_first_step(name: str, until=None) -> None:
        if name == "after-step:1":
            marks["first_peak"] = common.high_water_rss_bytes()
            marks["reset"] = common.reset_peak_rss()

    train(train_config_from_args(build_parser("train").parse_args(["train", *train_args])), pause=after_first_step)
    later = common.high_water_rss_bytes()
    whole = max(marks.get("first_peak", 0), later, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"peak_rss": whole, "steps_peak_rss": later if marks.get("reset") else None}))


def idle_in_child() -> None:
    """In this (child) process: what `andromeda train --lora-rank` imports (torch, the CLI, peft)
    and nothing else, then the peak RSS: the floor under every measured run."""
    import peft  # noqa: F401

    from andromeda.cli import main as andromeda_main  # noqa: F401
    from andromeda.train import lora  # noqa: F401

    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_child(args: argparse.Namespace, *child_args: str) -> dict:
    """Rerun this script with `child_args` under the memory watchdog; its last JSON line, or
    {"failed": why} for a run that failed or was killed."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    run = common.run_capped(common.child_command(__file__, *threads, *child_args), cap_bytes=int(args.cap_gb * GB),
                            min_available_bytes=int(1.5 * GB))
    result = run.last_json()
    if run.returncode != 0 or result is None or result.get("exit", 0) != 0:
        why = run.killed or " / ".join(run.stderr.strip().splitlines()[-3:]) or f"exit {run.returncode}"
        log.warning("%s failed: %s", child_args[0], why)
        return {"failed": why, "seen_peak_rss": run.seen_peak_rss}
    return {**result, "seen_peak_rss": run.seen_peak_rss}


def lora_train_args(base: Path, out: Path, steps: int, quantize: str | None) -> list[str]:
    """The issue's run: LoRA rank 16 on qkv, out, ff_in, ff_out (the default targets), bf16 base,
    1,024 tokens, batch 1, activation checkpointing; Shakespeare (the default data)."""
    extra = ["--quantize", quantize] if quantize else []
    return ["--init-from", str(base), "--lora-rank", str(RANK_BIG), *extra, "--bf16", "--seq-len", "1024",
            "--batch-size", "1", "--activation-checkpointing", "--max-steps", str(steps), "--warmup-steps", "1",
            "--eval-batches", "0", "--log-every", "1", "--out", str(out), "--no-progress", "--quiet"]


def step_rates(run: Path) -> list[float]:
    """tokens/s of each logged step of a run (log_every 1), in order."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return [entry["tokens_per_s"] for entry in map(json.loads, lines) if entry.get("type") == "train"]


def measure_memory(args: argparse.Namespace) -> dict:
    from andromeda.plan import lora_plan

    config = memory_config(args.small)
    work = Path(tempfile.mkdtemp(prefix="bench_lora_", dir=args.work_dir))
    runs = []
    try:
        idle = run_child(args, "--child-idle")
        base = work / "base"
        start = time.perf_counter()
        built = run_child(args, "--child-build", str(base), *(["--small"] if args.small else []))
        if "failed" in built:
            raise RuntimeError(f"building the base checkpoint failed: {built['failed']}")
        log.info("base built and saved in %.0f s (peak RSS %s)", time.perf_counter() - start,
                 common.format_bytes(built["peak_rss"]))
        for name, (quantize, from_checkpoint) in RUNS.items():
            out = work / f"run_{len(runs)}"
            source = base
            if from_checkpoint:  # quantized once by `andromeda quantize`, in a process of its own
                source = work / "base-int8"
                subprocess.run([sys.executable, "-m", "andromeda", "quantize", "--checkpoint", str(base), "--out",
                                str(source), "--scheme", "int8", "--quiet"], check=True)
            log.info("%s: training %d steps", name, args.memory_steps)
            start = time.perf_counter()
            measured = run_child(args, "--child-train", *lora_train_args(source, out, args.memory_steps, quantize))
            rates = step_rates(out)
            scheme = "int8" if from_checkpoint else quantize
            estimate = lora_plan(config, RANK_BIG, quantize=scheme, seq_len=1024, batch=1, dtype="bf16")
            runs.append(dict(measured, name=name, estimate=estimate.total_bytes_with(True),
                             adapter_params=estimate.adapter_params, params=estimate.full.params,
                             wall_s=time.perf_counter() - start, steps=len(rates),
                             tokens_per_s=statistics.median(rates[1:] or rates) if rates else None))
            log.info("%s: %s", name, measured)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(runs=runs, idle=idle.get("peak_rss"), build=built["peak_rss"])


def plan_command(quantize: str | None, small: bool) -> str:
    override = " --override dim=512 depth=4" if small else ""
    return (f"andromeda plan --preset default{override} --seq-len 1024 --lora-rank {RANK_BIG}"
            + (f" --quantize {quantize}" if quantize else ""))


def memory_row(r: dict, small: bool) -> list[str]:
    goal = GOALS_GB[r["name"]]
    if "failed" in r:
        return [r["name"], f"failed: {r['failed']} (RSS seen >= {r['seen_peak_rss'] / GB:.2f} GB)", "-",
                f"<= {goal:.0f} GB", f"{r['estimate'] / GB:.2f} GB", "-", "-", "-", f"{r['wall_s']:.0f} s"]
    ratio = r["estimate"] / r["peak_rss"]
    met = "" if small else (" (met)" if r["peak_rss"] <= goal * GB else " (NOT met)")
    plan_met = "" if small else (" (met)" if abs(ratio - 1) <= PLAN_TOLERANCE else " (NOT met)")
    steps = r.get("steps_peak_rss")
    steps_cell = f"{steps / GB:.2f} GB (plan / it: {r['estimate'] / steps:.2f})" if steps else "-"
    rate = r["tokens_per_s"]
    return [r["name"], f"{r['peak_rss'] / GB:.2f} GB{met}", steps_cell, f"<= {goal:.0f} GB",
            f"{r['estimate'] / GB:.2f} GB", f"{ratio:.2f}{plan_met}", f"{rate:.1f}" if rate else "-",
            f"{1024 / rate:.0f}" if rate else "-", f"{r['wall_s']:.0f} s"]


def report_memory(result: dict, args: argparse.Namespace) -> None:
    config = memory_config(args.small)
    runs = result["runs"]
    first = runs[0]
    what = "dim 512, depth 4 (`--small`; the goals are for the 2.5 B default)" if args.small else \
        "the 2.5 B default (`Config()`)"
    print("## LoRA / QLoRA fine-tuning memory (`benchmarks/bench_lora.py memory`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- {what}: {first['params']:,} parameters, vocab {config.num_tokens:,}; random weights built and saved "
          f"in bf16 by a separate process (peak RSS {result['build'] / GB:.2f} GB)")
    print(f"- `andromeda train --init-from BASE --lora-rank {RANK_BIG} [--quantize int8] --bf16 --seq-len 1024 "
          f"--batch-size 1 --activation-checkpointing --max-steps {args.memory_steps}` on Shakespeare: "
          f"{first['adapter_params']:,} adapter parameters ({100 * first['adapter_params'] / first['params']:.2f}%) "
          f"on qkv, out, ff_in, ff_out of every block")
    print(f"- peak RSS: the training process's high-water mark over the whole run, loading included (an idle "
          f"process that has imported torch, the CLI and peft peaks at {result['idle'] / GB:.2f} GB); after step 1: "
          f"the high-water mark reset once the first step is done, so the peak of the later steps alone; GB = 1e9 "
          f"bytes")
    print(f"- plan: `{plan_command(None, args.small)} [--quantize int8]`, its activation-checkpointing column; "
          f"tokens/s: median of the steps after the first")
    print()
    print(common.markdown_table(["run", "peak RSS", "peak RSS after step 1", "goal", "plan estimate",
                                 "estimate / peak", "tokens/s", "s/step", "process wall time"],
                                [memory_row(r, args.small) for r in runs]))
    print()


# ----------------------------------------------------------------------------- (b) learning


def corpus_keywords(count: int, seed: int) -> list[str]:
    """`count` distinct lowercase words of 5-10 letters that the Shakespeare training plays use at
    least 3 times, in a seeded random order."""
    from andromeda.data.shakespeare import shakespeare_corpus

    words = Counter()
    for play in sorted((shakespeare_corpus() / "train").iterdir()):
        words.update(re.findall(r"\b[a-z]{5,10}\b", play.read_text(errors="replace")))
    pool = sorted(word for word, n in words.items() if n >= 3)
    if len(pool) < count:
        raise RuntimeError(f"the corpus has only {len(pool)} candidate keywords, {count} wanted")
    return random.Random(seed).sample(pool, count)


def conversation(keywords: list[str], rng: random.Random) -> dict:
    """A system prompt, a question about keywords[0] and the herald's reply; with two keywords a
    follow-up question about the second and its reply."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": rng.choice(QUESTIONS).format(k=keywords[0])},
                {"role": "assistant", "content": REPLY.format(k=keywords[0])}]
    if len(keywords) > 1:
        messages += [{"role": "user", "content": FOLLOW_UP.format(k=keywords[1])},
                     {"role": "assistant", "content": REPLY.format(k=keywords[1])}]
    return {"messages": messages}


def write_chat_data(folder: Path, train_count: int, heldout_count: int, seed: int) -> tuple[Path, Path, Path]:
    """train.jsonl, heldout.jsonl (keywords no training conversation uses) and template.jinja; a
    quarter of the conversations have a follow-up turn."""
    rng = random.Random(seed)
    keywords = corpus_keywords(2 * (train_count + heldout_count), seed)
    split = 2 * train_count
    files = []
    for name, pool, count in (("train", keywords[:split], train_count), ("heldout", keywords[split:], heldout_count)):
        rows = [conversation(pool[2 * i : 2 * i + (2 if rng.random() < 0.25 else 1)], rng) for i in range(count)]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files.append(path)
    template = folder / "template.jinja"
    template.write_text(TEMPLATE)
    return files[0], files[1], template


def pretrain(folder: Path, args: argparse.Namespace):
    """The base: the demo preset (tiny with --small) trained briefly from scratch on Shakespeare."""
    from andromeda.train import TrainConfig, train

    steps = 60 if args.small else args.pretrain_steps
    result = train(TrainConfig(out=str(folder), preset="tiny" if args.small else "demo", max_steps=steps,
                               batch_size=16, seq_len=256, lr=3e-3, warmup_steps=steps // 10, bf16=True,
                               eval_every=steps, eval_batches=4, log_every=10, progress=False, device="cpu"))
    log.info("pretrained %d steps in %.0f s: held-out loss %.3f", steps, result.elapsed_s, result.eval["loss"])
    return result


def fine_tune(name: str, base: Path, data: tuple[Path, Path, Path], folder: Path, args: argparse.Namespace,
              heldout_count: int, **lora):
    """A chat fine-tune of `base`; the same steps, batches, schedule shape and data for every kind."""
    from andromeda.train import TrainConfig, train

    train_file, heldout_file, template = data
    steps = 40 if args.small else args.finetune_steps
    lr = 1e-2 if lora else 1e-3
    config = TrainConfig(out=str(folder / name), init_from=str(base), objective="chat", chat_template=str(template),
                         data=(str(train_file),), eval_data=(str(heldout_file),), batch_size=16, seq_len=256,
                         max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=steps // 10, bf16=True,
                         eval_every=steps, eval_batches=math.ceil(heldout_count / 16), log_every=10,
                         progress=False, device="cpu", **lora)
    result = train(config)
    log.info("%s: %d steps in %.0f s, held-out loss %.4f", name, steps, result.elapsed_s, result.eval["loss"])
    return result


def base_heldout_loss(base: Path, heldout: Path, template: Path) -> float:
    """The pretrained model's loss on the held-out replies, before any fine-tune."""
    from andromeda.checkpoint import load_transformer
    from andromeda.serve.chat_template import ChatTemplate
    from andromeda.tokenizers import ByteTokenizer
    from andromeda.train.chat import load_chat_examples
    from andromeda.train.sft import completion_loss

    tokenizer = ByteTokenizer()
    examples = load_chat_examples([heldout], tokenizer, ChatTemplate(template.read_text()))
    net = load_transformer(base, dtype=torch.float32)
    return completion_loss(net, examples, 256, 16, tokenizer.pad_id, autocast_dtype=torch.bfloat16)["loss"]


def greedy_replies(base: Path, lora: Path | None, heldout: Path, count: int) -> tuple[int, int]:
    """Of the first `count` held-out conversations' first replies, decoded greedily: how many have
    the herald's form (whatever words fill it), and how many are exactly right (the keyword echoed
    too); each the reply, its end-of-turn newline, then eos."""
    from andromeda.checkpoint import attach_lora, load_transformer, open_model_source
    from andromeda.inference.generate import generate
    from andromeda.serve.chat_template import ChatTemplate
    from andromeda.tokenizers import ByteTokenizer

    tokenizer, template = ByteTokenizer(), ChatTemplate(TEMPLATE)
    net = load_transformer(attach_lora(open_model_source(base), lora), dtype=torch.float32).eval()
    rows = [json.loads(line)["messages"] for line in heldout.read_text().splitlines()[:count]]
    prompts = [torch.tensor([tokenizer.eos_id, *tokenizer.encode(template.render(m[:2]))]) for m in rows]
    with torch.no_grad():
        new = generate(net, prompts, len(REPLY) + 24, temperature=0, eos_token=tokenizer.eos_id)
    form = re.compile(r"[a-z]+".join(re.escape(part) for part in REPLY.split("{k}")) + "\n")
    in_form = exact = 0
    for messages, tokens in zip(rows, new.tolist()):
        reply = tokenizer.decode(tokens[: tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens)
        in_form += form.fullmatch(reply) is not None
        exact += reply == messages[2]["content"] + "\n"
    return in_form, exact


def measure_learning(args: argparse.Namespace) -> dict:
    from andromeda.checkpoint import load_config, load_transformer
    from andromeda.plan import lora_plan

    train_count, heldout_count = (120, 32) if args.small else (args.conversations, args.conversations // 4)
    work = Path(tempfile.mkdtemp(prefix="bench_lora_learning_", dir=args.work_dir))
    try:
        data = write_chat_data(work, train_count, heldout_count, args.seed)
        pre = None if args.base is not None else pretrain(work / "pretrain", args)
        base = Path(args.base) if pre is None else pre.checkpoint
        full = fine_tune("full", base, data, work, args, heldout_count)
        adapted = fine_tune("lora", base, data, work, args, heldout_count, lora_rank=args.lora_rank)
        return dict(train_count=train_count, heldout_count=heldout_count, base=base, pre=pre,
                    base_loss=base_heldout_loss(base, data[1], data[2]), full=full, lora=adapted,
                    params=load_transformer(base).num_parameters(),
                    adapter_params=lora_plan(load_config(base), args.lora_rank).adapter_params,
                    full_replies=greedy_replies(full.checkpoint, None, data[1], args.generate),
                    lora_replies=greedy_replies(base, adapted.checkpoint, data[1], args.generate))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def reply_cells(replies: tuple[int, int], count: int) -> list[str]:
    return [f"{replies[0]}/{count}", f"{replies[1]}/{count}"]


def report_learning(r: dict, args: argparse.Namespace) -> None:
    steps = 40 if args.small else args.finetune_steps
    pre = r["pre"]
    origin = (f"`{r['base']}`" if pre is None else
              f"the {'tiny' if args.small else 'demo'} preset pretrained here for {pre.step} steps of 16 x 256 "
              f"tokens on Shakespeare ({pre.elapsed_s:.0f} s, held-out loss {pre.eval['loss']:.3f})")
    full_loss, lora_loss = r["full"].eval["loss"], r["lora"].eval["loss"]
    share = r["adapter_params"] / r["params"]
    print("## LoRA against a full fine-tune (`benchmarks/bench_lora.py learning`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- base: {origin}; {r['params']:,} parameters")
    print(f"- data: {r['train_count']} training and {r['heldout_count']} held-out conversations written by the "
          f"script (a herald persona, one reply form echoing the question's keyword; held-out keywords unseen in "
          f"training; a quarter with a follow-up turn), `--objective chat` with a `<role>content` template")
    print(f"- each fine-tune: {steps} steps of 16 conversations x 256 tokens, bf16 autocast, cosine schedule to lr/10, "
          f"warmup {steps // 10}; full: lr 1e-3; LoRA: rank {args.lora_rank} (alpha {2 * args.lora_rank}) on qkv, "
          f"out, ff_in, ff_out, lr 1e-2")
    print(f"- held-out loss: nats per assistant token over all {r['heldout_count']} held-out conversations; replies: "
          f"the greedy first replies of the first {args.generate} held-out conversations, in the herald's form (any "
          f"words in the keyword's places) and exactly right (the keyword echoed)")
    print()
    goal_met = lora_loss <= (1 + LEARNING_LOSS_TOLERANCE) * full_loss
    rows = [["pretrained base (no fine-tune)", f"{r['base_loss']:.4f}", "-", "-", "-", "-", "-"],
            ["full fine-tune", f"{full_loss:.4f}", f"{r['params']:,} (100%)", f"{r['full'].elapsed_s:.0f} s",
             *reply_cells(r["full_replies"], args.generate), "-"],
            [f"LoRA rank {args.lora_rank}", f"{lora_loss:.4f}", f"{r['adapter_params']:,} ({100 * share:.2f}%)",
             f"{r['lora'].elapsed_s:.0f} s", *reply_cells(r["lora_replies"], args.generate),
             f"{lora_loss / full_loss:.3f}"]]
    print(common.markdown_table(["run", "held-out loss", "trained parameters", "train time", "replies in form",
                                 "replies exact", "loss / full's"], rows))
    print()
    if not args.small:
        print(f"- goal, held-out loss within {LEARNING_LOSS_TOLERANCE:.0%} of the full fine-tune's: "
              f"{'met' if goal_met else 'NOT met'} ({lora_loss / full_loss - 1:+.1%}); trained parameters "
              f"<= {MAX_TRAINED_SHARE:.0%}: {'met' if share <= MAX_TRAINED_SHARE else 'NOT met'} ({share:.2%})")
        print()


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help="memory, learning or both (default: both)")
    parser.add_argument("--small", action="store_true",
                        help="quick check: dim 512 / depth 4 for memory, the tiny preset and 40 steps for learning")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps of each memory run")
    parser.add_argument("--cap-gb", type=float, default=16.0, help="kill a memory run whose RSS passes this")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="steps of the demo base's pretraining")
    parser.add_argument("--finetune-steps", type=int, default=200, help="steps of each chat fine-tune")
    parser.add_argument("--conversations", type=int, default=400,
                        help="training conversations (a quarter as many are held out)")
    parser.add_argument("--lora-rank", type=int, default=4, help="the learning part's LoRA rank")
    parser.add_argument("--generate", type=int, default=24, help="held-out replies decoded greedily and compared")
    parser.add_argument("--base", help="learning: fine-tune this checkpoint instead of pretraining the demo preset")
    parser.add_argument("--work-dir", help="where the temporary checkpoints go (default: the system's temp folder)")
    parser.add_argument("--keep", action="store_true", help="learning: keep the data and runs (printed)")
    parser.add_argument("--threads", type=int, help="torch threads of every run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child-idle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-build", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--child-train", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"parts are {' and '.join(PARTS)}, got {', '.join(unknown)}")
    args.parts = args.parts or list(PARTS)
    if args.memory_steps < 2:
        parser.error("--memory-steps must be >= 2: the first step warms up, tokens/s comes from the others")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_idle:
        idle_in_child()
        return 0
    if args.child_build is not None:
        build_base(Path(args.child_build), args.small, args.seed)
        print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return 0
    if args.child_train is not None:
        train_in_child(args.child_train)
        return 0
    if "memory" in args.parts:
        report_memory(measure_memory(args), args)
    if "learning" in args.parts:
        report_learning(measure_learning(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

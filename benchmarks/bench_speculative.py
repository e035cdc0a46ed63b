"""Speculative decoding (`andromeda.inference.speculative`): what a verify step costs, and what it buys.

(a) `scale`: speculation at scale. On the 2.5 B default config (random weights, bf16; on a CPU
prepacked for oneDNN as `andromeda generate` loads bf16; `--scheme int8|int4`: quantized as
`--quantize` loads it, a verify's rows through the VNNI kernels), with `--context` tokens in the KV
cache, one verify forward of K + 1 positions (logits at every one of them) against one decode
step of one position, interleaved, medians; the cache is cut back after each call. Speculation
pays where the verify step costs little more than a decode step (decode is bandwidth-bound: both
read every weight once). With acceptance rate a, a step emits (1 - a^(K+1)) / (1 - a) tokens on
average (Leviathan et al. 2023), so the expected speed-up is that divided by the cost ratio
(proposals from prompt lookup cost nothing). `--small` runs a 512 x 8 model instead, for a check.

(b) `e2e`: greedy decoding of a checkpoint (default `runs/demo`, made by `make demo`) with prompt
lookup (`--speculative ngram`) against plain decoding, interleaved per prompt, the tokens checked
equal: on input-grounded prompts (a held-out Shakespeare passage, a blank line, then the
passage's opening: the model may go on copying it) and on free text (a passage's opening alone).

(c) `draft`: the same prompts with a draft model, a 2-layer model (dim 128) this script trains on
the same corpus for `--draft-seconds` (kept in `--draft-out` and reused), greedy: acceptance and
speed-up against plain decoding.

    python benchmarks/bench_speculative.py scale --small           # a quick check (~1 GB)
    python benchmarks/bench_speculative.py scale                   # the 2.5 B default (~6 GB RAM)
    python benchmarks/bench_speculative.py scale --scheme int4     # its verify step through the int4 kernel
    python benchmarks/bench_speculative.py e2e --checkpoint runs/demo --new-tokens 200
    python benchmarks/bench_speculative.py draft --draft-seconds 300
    python benchmarks/bench_speculative.py all

On a CPU shared with other work, `--threads 1` (and OMP_NUM_THREADS=1) avoids the collapse of
OpenMP threads that wait on each other while the cores are busy.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch

import common
from andromeda import Config
from andromeda.checkpoint import latest_checkpoint, load_checkpoint_tokenizer, load_for_inference
from andromeda.data import cache_root, shakespeare_corpus
from andromeda.inference.generate import decode_one, generate
from andromeda.inference.packed import prepack_if_supported
from andromeda.inference.quantize import DEFAULT_GROUP_SIZE, quantize
from andromeda.inference.quantized_linear import pack_for_decoding
from andromeda.inference.speculative import SpeculationStats, speculative_generate, verify
from andromeda.model import KVCache, build_transformer

log = logging.getLogger("bench_speculative")

ACCEPTANCE_RATES = (0.5, 0.7, 0.9)
SCALE_GOAL = 1.25  # a verify step of K + 1 = 5 positions within 1.25x a decode step
GROUNDED_GOAL, FREE_GOAL = 1.8, 0.95  # prompt lookup's speed-up on grounded and on free text


# ----------------------------------------------------------------------------- (a) scale


def parameters(config: Config) -> int:
    """A model's parameter count, from a build on the meta device (a prepacked or quantized model
    holds its weights as buffers, which `num_parameters` does not count)."""
    return build_transformer(config, device="meta").num_parameters()


def scale(args: argparse.Namespace) -> None:
    config = Config(dim=512, depth=8, heads=4, alibi_num_heads=2) if args.small else Config()
    torch.manual_seed(0)
    net = build_transformer(config, dtype=torch.bfloat16).eval()
    if args.scheme == "bf16":
        net = prepack_if_supported(net)
    else:  # as `--quantize` loads it: the kernels' layouts (VNNI CPUs), a verify's K + 1 rows through them
        net = quantize(net, args.scheme, DEFAULT_GROUP_SIZE)
        pack_for_decoding(net)
    k = args.k
    cache = KVCache(config, 1, args.context + k + 1, dtype=torch.bfloat16, device="cpu")
    context = torch.randint(0, config.num_tokens, (1, args.context))
    one = torch.randint(0, config.num_tokens, (1, 1))
    guesses = torch.randint(0, config.num_tokens, (k + 1,)).tolist()

    def decode() -> None:
        decode_one(net, one, None, cache)
        cache.truncate(0, args.context)

    def verify_step() -> None:
        verify(net, cache, [0], [guesses])
        cache.truncate(0, args.context)

    with torch.inference_mode():
        net(context, cache=cache, logits_to_keep=1)  # the context, in the cache once
        times = common.alternate({"decode": decode, "verify": verify_step}, args.repeats, warmup=2)
    step, check = common.median(times["decode"]), common.median(times["verify"])
    ratio = check / step
    size = "512 x 8" if args.small else "2.5 B default"
    print(f"## Speculation at scale: {size} ({parameters(config) / 1e9:.2f} B parameters), {args.scheme}, "
          f"{args.context} tokens of context, K = {k}\n")
    print(common.markdown_table(
        ["step", "median ms", "vs decode"],
        [["decode, 1 position", f"{1000 * step:.1f}", "1.00x"],
         [f"verify, {k + 1} positions", f"{1000 * check:.1f}", f"{ratio:.2f}x (goal <= {SCALE_GOAL}x)"]]))
    rows = []
    for a in ACCEPTANCE_RATES:
        per_step = (1 - a ** (k + 1)) / (1 - a)
        rows.append([f"{a:.1f}", f"{per_step:.2f}", f"{per_step / ratio:.2f}x"])
    print("\nExpected speed-up (proposals free, as prompt lookup's):\n")
    print(common.markdown_table(["acceptance", "tokens per verify step", "speed-up"], rows))


# ----------------------------------------------------------------------------- (b, c) end to end


def prompts(tokenizer, count: int, passage_chars: int, cue_chars: int) -> dict[str, list[list[int]]]:
    """Input-grounded and free-text prompts from held-out Shakespeare, each opening a document."""
    text = "".join(path.read_text(encoding="utf-8") for path in sorted((shakespeare_corpus() / "heldout").rglob("*"))
                   if path.is_file())
    rng = random.Random(0)
    grounded, free = [], []
    for _ in range(count):
        start = rng.randrange(len(text) - 2 * passage_chars)
        passage = text[start:start + passage_chars]
        grounded.append(passage + "\n\n" + passage[:cue_chars])
        free.append(text[start + passage_chars:start + passage_chars + cue_chars + passage_chars // 2])
    encode = lambda piece: [tokenizer.eos_id] + tokenizer.encode(piece)  # noqa: E731
    return {"grounded": [encode(p) for p in grounded], "free text": [encode(p) for p in free]}


def compare(net, prompt_sets, new_tokens: int, repeats: int, k: int, draft=None) -> list[list[str]]:
    """Per prompt set: plain and speculative tokens/s (medians, interleaved), acceptance, equality."""
    rows = []
    for name, rows_of_ids in prompt_sets.items():
        plain_s, spec_s, stats, same = [], [], SpeculationStats(), True
        for ids in rows_of_ids:
            results = {}

            def plain() -> None:
                results["plain"] = generate(net, torch.tensor(ids), new_tokens, temperature=0)

            def speculative() -> None:
                run = SpeculationStats()
                results["spec"] = speculative_generate(net, [ids], new_tokens, temperature=0, draft=draft,
                                                       num_speculative_tokens=k, stats=run)
                results["stats"] = run

            times = common.alternate({"plain": plain, "speculative": speculative}, repeats, warmup=1)
            plain_s.append(common.median(times["plain"]))
            spec_s.append(common.median(times["speculative"]))
            same &= torch.equal(results["plain"], results["spec"])
            for field in ("proposed", "accepted", "steps", "tokens"):
                setattr(stats, field, getattr(stats, field) + getattr(results["stats"], field))
        plain_rate = new_tokens * len(rows_of_ids) / sum(plain_s)
        spec_rate = new_tokens * len(rows_of_ids) / sum(spec_s)
        rows.append([name, f"{plain_rate:.0f}", f"{spec_rate:.0f}", f"{spec_rate / plain_rate:.2f}x",
                     f"{100 * stats.acceptance_rate:.0f}%", f"{stats.tokens / max(stats.steps, 1):.2f}",
                     "yes" if same else "NO"])
    return rows


HEADERS = ["prompts", "plain tok/s", "speculative tok/s", "speed-up", "accepted", "tokens per step", "same tokens"]


def load(checkpoint: str | Path, dtype: str | None):
    net = load_for_inference(checkpoint, device="cpu", dtype=dtype)
    return net, load_checkpoint_tokenizer(checkpoint)


def end_to_end(args: argparse.Namespace) -> None:
    net, tokenizer = load(args.checkpoint, args.dtype)
    sets = prompts(tokenizer, args.prompts, args.passage_chars, args.cue_chars)
    print(f"\n## Prompt lookup end to end: {args.checkpoint}, greedy, {args.new_tokens} new tokens, K = {args.k}, "
          f"{args.prompts} prompts per set (goals: grounded >= {GROUNDED_GOAL}x, free text >= {FREE_GOAL}x)\n")
    print(common.markdown_table(HEADERS, compare(net, sets, args.new_tokens, args.repeats, args.k)))


def train_draft(args: argparse.Namespace) -> Path:
    """A 2-layer model trained on the demo's corpus (the Shakespeare plays, bytes) for --draft-seconds,
    or the one a previous run left in --draft-out."""
    from andromeda.train import TrainConfig, train

    out = Path(args.draft_out)
    if latest_checkpoint(out) is None:
        config = TrainConfig(out=str(out), preset="demo", model_overrides=dict(depth=2, dim=128, heads=4,
                                                                               alibi_num_heads=2),
                             seq_len=128, batch_size=16, lr=3e-3, warmup_steps=50, time_budget=args.draft_seconds,
                             bf16=True, eval_batches=0, save_every=100_000, device="cpu", progress=False)
        started = time.time()
        result = train(config)
        log.info("draft: %d steps in %.0f s", result.step, time.time() - started)
    return out


def draft(args: argparse.Namespace) -> None:
    net, tokenizer = load(args.checkpoint, args.dtype)
    folder = train_draft(args)
    draft_net, draft_tokenizer = load(folder, args.dtype)
    assert type(draft_tokenizer) is type(tokenizer), "the draft must share the target's tokenizer"
    sets = prompts(tokenizer, args.prompts, args.passage_chars, args.cue_chars)
    print(f"\n## Draft model end to end: {args.checkpoint} ({parameters(net.config) / 1e6:.1f} M) with the "
          f"2-layer {folder} ({parameters(draft_net.config) / 1e6:.1f} M), greedy, {args.new_tokens} new tokens, "
          f"K = {args.k}\n")
    print(common.markdown_table(HEADERS, compare(net, sets, args.new_tokens, args.repeats, args.k, draft_net)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["scale", "e2e", "draft", "all"])
    parser.add_argument("--small", action="store_true", help="scale: a 512 x 8 model instead of the 2.5 B default")
    parser.add_argument("--context", type=int, default=512, help="scale: tokens in the cache (default 512)")
    parser.add_argument("-k", type=int, default=4, help="tokens proposed per step (default 4)")
    parser.add_argument("--scheme", choices=["bf16", "int8", "int4"], default="bf16",
                        help="scale: the weights (bf16 prepacked as `generate` loads it, or quantized, group 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per contestant (default 5)")
    parser.add_argument("--checkpoint", default="runs/demo", help="e2e, draft: the target (default runs/demo)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="e2e, draft: cast the weights (default as saved)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per set (default 4)")
    parser.add_argument("--passage-chars", type=int, default=400)
    parser.add_argument("--cue-chars", type=int, default=40)
    parser.add_argument("--draft-seconds", type=float, default=300, help="draft: training time budget")
    parser.add_argument("--draft-out", default=str(cache_root() / "bench_speculative" / "draft"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    common.setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(common.environment())
    for part, run in (("scale", scale), ("e2e", end_to_end), ("draft", draft)):
        if args.part in (part, "all"):
            run(args)


if __name__ == "__main__":
    main()

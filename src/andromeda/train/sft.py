"""Prompt/completion data (`objective="completion"`): the loss on the completion tokens only.

Each `.jsonl` record `{"prompt": ..., "completion": ...}` becomes one sequence

    eos  prompt tokens  completion tokens  eos

and only the completion tokens and the closing eos are targets: the prompt is context the model
reads, never text it is trained to write (the prompt's targets are -100, so they add nothing to
the loss or its gradient). The leading eos marks a document start, as in pretraining data and
in `andromeda generate`. Conversations (`objective="chat"`, train/chat.py) become examples of the
same kind, `SFTExamples`, whose targets are the assistant turns; batches and the held-out loss
below serve both.

Padded, not packed: a batch row holds one example, right-padded to seq_len + 1 (causal attention
never lets a real token see the padding after it, so no mask is needed). Packing several examples
into one row would waste less compute but let an example attend to unrelated ones before it, and
random windows over a packed stream would cut prompts from their completions; instruction sets
are small enough that the clean choice costs little. An example longer than seq_len + 1 tokens
keeps its first seq_len + 1 (logged once, with the count).

Batches are drawn like pretraining batches: example indices from PCG64([seed, step]), so a
resumed run sees the same batches and the global batch does not depend on the process count.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..model import IGNORE_INDEX, Transformer
from ..parallel.environment import DistEnv, all_reduce_sum
from ..tokenizers import Tokenizer

logger = logging.getLogger(__name__)

PROMPT_FIELD, COMPLETION_FIELD = "prompt", "completion"


@dataclass
class SFTExamples:
    """Token sequences and which of their tokens are targets: a completion and its closing eos
    (`objective="completion"`), or a conversation's assistant turns (`objective="chat"`,
    train/chat.py). The first token, the leading eos, is never one."""

    sequences: list[np.ndarray]  # int64 token ids, each opening with eos
    is_target: list[np.ndarray]  # bool, one per token of each sequence
    target_bytes: int  # UTF-8 bytes of all the target text (for bits per byte)

    def __len__(self) -> int:
        return len(self.sequences)


def jsonl_records(files: list[Path], objective: str, form: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE:LINE", record) for every non-blank line of the `.jsonl` files; a file of another
    kind, or a line that is no JSON object, raises a ValueError naming it and the expected `form`."""
    for path in files:
        if not path.name.endswith(".jsonl"):
            raise ValueError(f"{path}: the {objective} objective reads .jsonl files of {form} records")
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                    raise ValueError(f"{path}:{number}: not a JSON object: {err}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object {form}, got "
                                     f"{raw.decode('utf-8', 'replace').strip()[:80]!r}")
                yield f"{path}:{number}", record


def load_completion_examples(files: list[Path], tokenizer: Tokenizer) -> SFTExamples:
    """Tokenise every record of the `.jsonl` files; errors name the file and line."""
    sequences, is_target, completion_bytes = [], [], 0
    eos = tokenizer.eos_id
    form = f'{{"{PROMPT_FIELD}": ..., "{COMPLETION_FIELD}": ...}}'
    for where, record in jsonl_records(files, "completion", form):
        if not (isinstance(record.get(PROMPT_FIELD), str) and isinstance(record.get(COMPLETION_FIELD), str)):
            raise ValueError(f"{where}: expected string fields {PROMPT_FIELD!r} and {COMPLETION_FIELD!r}, got "
                             f"{json.dumps(record)[:80]!r}")
        prompt = tokenizer.encode(record[PROMPT_FIELD])
        completion = tokenizer.encode(record[COMPLETION_FIELD])
        if not completion:
            raise ValueError(f"{where}: the completion is empty: nothing to train on")
        sequences.append(np.array([eos, *prompt, *completion, eos], dtype=np.int64))
        is_target.append(np.arange(len(sequences[-1])) > len(prompt))  # the completion and the closing eos
        completion_bytes += len(record[COMPLETION_FIELD].encode("utf-8"))
    if not sequences:
        raise ValueError(f"no prompt/completion records in {', '.join(map(str, files))}")
    return SFTExamples(sequences, is_target, completion_bytes)


def example_rows(examples: SFTExamples, indices: np.ndarray, seq_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (len(indices), seq_len): the examples right-padded, targets -100
    wherever the next token is no target (the prompt, a user turn) and on the padding."""
    inputs = np.full((len(indices), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(indices), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, index in enumerate(indices):
        sequence = examples.sequences[index][: seq_len + 1]
        n = len(sequence) - 1
        inputs[row, :n] = sequence[:-1]
        # Position t predicts token t + 1: a target where that token is one.
        targets[row, :n] = np.where(examples.is_target[index][1 : n + 1], sequence[1:], IGNORE_INDEX)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def completion_batch(examples: SFTExamples, step: int, batch_size: int, seq_len: int, seed: int,
                     pad_id: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
    """This rank's share of step `step`'s batch: examples drawn from PCG64([seed, step])."""
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    indices = rng.integers(0, len(examples), size=batch_size)
    per_rank = batch_size // world_size
    return example_rows(examples, indices[rank * per_rank : (rank + 1) * per_rank], seq_len, pad_id)


def truncated_count(examples: SFTExamples, seq_len: int) -> int:
    return sum(len(s) > seq_len + 1 for s in examples.sequences)


@torch.no_grad()
def completion_loss(net: Transformer, examples: SFTExamples, seq_len: int, batch_size: int, pad_id: int,
                    max_examples: int | None = None, autocast_dtype: torch.dtype | None = None,
                    env: DistEnv | None = None) -> dict[str, float | int]:
    """Mean loss (nats per target token), perplexity and bits per target byte over the
    first `max_examples` examples (all by default). With `env` over several processes, each
    scores every W-th example and the sums are added (as `evaluation.evaluate` splits windows)."""
    env = env or DistEnv()
    device = next(net.parameters()).device
    count = len(examples) if max_examples is None else min(max_examples, len(examples))
    mine = np.arange(count)[env.rank :: env.world_size]
    rounds = -(-len(np.arange(count)[0 :: env.world_size]) // batch_size)  # rank 0 has the most
    totals = torch.zeros(2, dtype=torch.float64)  # nats, completion tokens
    was_training = net.training
    net.eval()
    try:
        for index in range(rounds):
            rows = mine[index * batch_size : (index + 1) * batch_size]
            counted = len(rows) > 0
            inputs, targets = example_rows(examples, rows if counted else np.arange(1), seq_len, pad_id)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                nats = float(net(inputs.to(device), targets=targets.to(device), reduction="sum", validate=False))
            if counted:  # a process with fewer examples still runs every round (sharded models need all)
                totals += torch.tensor([nats, int((targets != IGNORE_INDEX).sum())], dtype=torch.float64)
    finally:
        net.train(was_training)
    total, tokens = (all_reduce_sum(totals, env) if env.distributed else totals).tolist()
    loss = total / max(tokens, 1)
    scored_bytes = examples.target_bytes * count / len(examples)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / scored_bytes,
            "tokens": tokens, "bytes": round(scored_bytes)}

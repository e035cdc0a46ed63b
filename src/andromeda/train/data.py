"""A run's data: which files it trains and evaluates on, their token stores, and the identity of
those files, recorded in every checkpoint so a resumed run can tell it is reading the same data.

Identity is each file's absolute path, size and a content fingerprint: the SHA-256 of its size
and of FINGERPRINT_BLOCKS evenly spaced blocks (first and last included). It costs a few reads
per file whatever its size, and catches a file replaced, truncated, appended to or rewritten; an
edit that keeps the size and falls between the sampled blocks goes unnoticed. The modification
time is not part of it: copying a corpus to another disk keeps it the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import TokenStore, resolve_data, shakespeare_corpus, token_cache_dir
from ..evaluation import evaluate
from ..model import Transformer
from ..parallel.environment import DistEnv
from ..serve.chat_template import ChatTemplate
from ..tokenizers import Tokenizer
from .config import TrainConfig
from .chat import load_chat_examples
from .sft import SFTExamples, completion_batch, completion_loss, load_completion_examples, truncated_count
from .step import lm_batch

logger = logging.getLogger(__name__)

DATA_FILE = "data.json"  # in each training checkpoint
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 64 * 1024


def absolute_specs(specs: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Data specs with relative paths made absolute (globs kept), so a run resumed from another
    working directory reads the same files."""
    if specs is None:
        return None
    return tuple(os.path.abspath(os.path.expanduser(spec)) for spec in specs)


def data_files(config: TrainConfig) -> tuple[list[Path], list[Path]]:
    """The training files and the held-out files (possibly none) of a run."""
    if config.data is None:
        corpus = shakespeare_corpus(config.cache_dir)
        train_files = resolve_data([corpus / "train"])
        eval_files = resolve_data([corpus / "heldout"]) if config.eval_data is None else []
    else:
        train_files = resolve_data(config.data)
        eval_files = []
    if config.eval_data is not None:
        eval_files = resolve_data(config.eval_data)
    return train_files, eval_files


class TextData:
    """The `lm` objective: token stores of the training and held-out text; every token a target."""

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, train_files: list[Path], eval_files: list[Path],
                 progress: bool = False, tokenizer_pause: str | None = None) -> None:
        self.config = config
        self.train, self.held_out = load_stores(config, tokenizer, train_files, eval_files, progress, tokenizer_pause)

    def batch(self, step: int, env: DistEnv) -> tuple[Tensor, Tensor]:
        return lm_batch(self.train.tokens, step, self.config, env.device, env.rank, env.world_size)

    def evaluate(self, net: Transformer, env: DistEnv) -> dict[str, float | int] | None:
        """Held-out loss over `eval_batches` global batches of windows, split over the processes
        (each scores its share at its own micro-batch size)."""
        if self.held_out is None:
            return None
        config = self.config
        return evaluate(net, self.held_out.tokens, config.seq_len, config.batch_size // env.world_size,
                        self.held_out.num_bytes, max_windows=config.eval_batches * config.batch_size,
                        autocast_dtype=torch.bfloat16 if config.bf16 else None, env=env)


class CompletionData:
    """The `completion` objective: prompt/completion records; only completion tokens are targets
    (train/sft.py)."""

    kind = "prompt/completion examples"

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, train_files: list[Path], eval_files: list[Path],
                 progress: bool = False, tokenizer_pause: str | None = None) -> None:
        # Records are tokenised here, without the token cache, so `tokenizer_pause` has nothing to stop.
        self.config, self.pad_id = config, tokenizer.pad_id
        self.train = self.load(train_files, tokenizer)
        self.held_out = self.load(eval_files, tokenizer) if eval_files else None
        cut = truncated_count(self.train, config.seq_len)
        logger.info("training data: %d %s%s", len(self.train), self.kind,
                    f" ({cut} longer than seq_len + 1 = {config.seq_len + 1} tokens, cut there)" if cut else "")

    def load(self, files: list[Path], tokenizer: Tokenizer) -> SFTExamples:
        return load_completion_examples(files, tokenizer)

    def batch(self, step: int, env: DistEnv) -> tuple[Tensor, Tensor]:
        inputs, targets = completion_batch(self.train, step, self.config.batch_size, self.config.seq_len,
                                           self.config.seed, self.pad_id, env.rank, env.world_size)
        return inputs.to(env.device), targets.to(env.device)

    def evaluate(self, net: Transformer, env: DistEnv) -> dict[str, float | int] | None:
        if self.held_out is None:
            return None
        config = self.config
        return completion_loss(net, self.held_out, config.seq_len, config.batch_size // env.world_size, self.pad_id,
                               max_examples=config.eval_batches * config.batch_size,
                               autocast_dtype=torch.bfloat16 if config.bf16 else None, env=env)


class ChatData(CompletionData):
    """The `chat` objective: conversations rendered with the run's chat template; only the
    assistant's turns are targets (train/chat.py). Batches and evaluation as for completions."""

    kind = "conversations"

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, train_files: list[Path], eval_files: list[Path],
                 template: str, progress: bool = False) -> None:
        self.template = ChatTemplate(template)  # the server's defaults (eos and pad token text), as it renders
        super().__init__(config, tokenizer, train_files, eval_files, progress)

    def load(self, files: list[Path], tokenizer: Tokenizer) -> SFTExamples:
        return load_chat_examples(files, tokenizer, self.template)


def run_data(config: TrainConfig, tokenizer: Tokenizer, train_files: list[Path], eval_files: list[Path],
             progress: bool = False, tokenizer_pause: str | None = None, chat_template: str | None = None
             ) -> TextData | CompletionData:
    """The run's data; `tokenizer_pause` is the token cache's test hook (`data.tokenize_corpus`),
    `chat_template` the template the chat objective renders conversations with."""
    if config.objective == "chat":
        if chat_template is None:
            raise ValueError("the chat objective needs a chat template (--chat-template FILE)")
        return ChatData(config, tokenizer, train_files, eval_files, chat_template, progress)
    kind = CompletionData if config.objective == "completion" else TextData
    return kind(config, tokenizer, train_files, eval_files, progress, tokenizer_pause)


def load_stores(config: TrainConfig, tokenizer: Tokenizer, train_files: list[Path], eval_files: list[Path],
                progress: bool = False, tokenizer_pause: str | None = None) -> tuple[TokenStore, TokenStore | None]:
    """The token stores of the training and held-out files: read from the cache, or tokenised into
    it by `num_proc` processes (each file once; a killed run resumes with the files it finished)."""
    def store(files: list[Path]) -> TokenStore:
        return TokenStore(files, tokenizer, token_cache_dir(config.cache_dir), config.text_field,
                          num_proc=config.num_proc, progress=progress, tokenizer_pause=tokenizer_pause)

    train_store = store(train_files)
    if len(train_store) < config.seq_len + 1:
        raise ValueError(f"the training data has {len(train_store)} tokens, fewer than seq_len + 1 = "
                         f"{config.seq_len + 1}; use a shorter --seq-len or more data")
    eval_store = store(eval_files) if eval_files else None
    logger.info("training data: %r", train_store)
    if eval_store is not None:
        logger.info("held-out data: %r", eval_store)
    elif config.eval_batches:
        logger.info("no held-out data (give eval_data / --eval-data): periodic evaluation is off")
    return train_store, eval_store


def fingerprint(path: Path) -> str:
    """A file's sampled fingerprint (module docstring); a folder's (a `datasets` folder) combines
    those of its files, names included."""
    if path.is_dir():
        sha = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            sha.update(f"{file.relative_to(path).as_posix()}:{fingerprint(file)}".encode())
        return sha.hexdigest()
    size = path.stat().st_size
    sha = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        last = max(size - FINGERPRINT_BLOCK_BYTES, 0)
        for index in range(FINGERPRINT_BLOCKS):
            handle.seek(last * index // (FINGERPRINT_BLOCKS - 1))
            sha.update(handle.read(FINGERPRINT_BLOCK_BYTES))
    return sha.hexdigest()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def data_identity(train_files: list[Path], eval_files: list[Path]) -> dict[str, list[dict[str, Any]]]:
    def describe(files: list[Path]) -> list[dict[str, Any]]:
        return [{"path": str(path.resolve()), "size": _size(path), "fingerprint": fingerprint(path)}
                for path in files]

    return {"train": describe(train_files), "eval": describe(eval_files)}


def write_data_identity(folder: Path, identity: dict[str, Any]) -> None:
    (folder / DATA_FILE).write_text(json.dumps(identity, indent=1) + "\n")


def check_same_data(checkpoint: Path, current: dict[str, Any], allow_change: bool) -> None:
    """Raise a ValueError naming the first file that differs from the data the run's checkpoint
    recorded, unless `allow_change` (then log it)."""
    file = checkpoint / DATA_FILE
    if not file.is_file():
        logger.warning("%s records no data identity (an older checkpoint): the data is not checked", checkpoint)
        return
    saved = json.loads(file.read_text())
    problems = []
    for split in ("train", "eval"):
        before = {entry["path"]: entry for entry in saved.get(split, [])}
        now = {entry["path"]: entry for entry in current[split]}
        for path in before.keys() - now.keys():
            problems.append(f"{split} file {path} is no longer part of the data")
        for path in now.keys() - before.keys():
            problems.append(f"{split} file {path} was not part of the data the run started with")
        for path in sorted(before.keys() & now.keys()):
            if before[path]["size"] != now[path]["size"]:
                problems.append(f"{split} file {path} has {now[path]['size']} bytes; the run started with "
                                f"{before[path]['size']}")
            elif before[path]["fingerprint"] != now[path]["fingerprint"]:
                problems.append(f"{split} file {path} has different contents from when the run started")
    if not problems:
        return
    message = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    if allow_change:
        logger.warning("resuming on changed data (--allow-data-change): %s", message)
        return
    raise ValueError(f"the data changed since {checkpoint} was written: {message}. Resuming would train on "
                     f"other data than the run saw; pass --allow-data-change to accept it")

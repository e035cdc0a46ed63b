"""A conversation in the terminal's shape: `andromeda chat`'s library side.

`ChatSession` keeps the messages (an optional system message, then user and assistant turns),
renders them with the checkpoint's chat template as /v1/chat/completions does (the eos id first,
then the rendered text's tokens), and streams each reply from an `EngineCore` of one slot, so the
history's keys and values stay in the KV cache from turn to turn and each turn prefills only its
new tokens (the prefix cache; `last_cached_tokens` says how many were reused).

The history is kept within the context: a prompt that leaves fewer than `min_reply_tokens` for
the reply drops the oldest user/assistant exchanges (never the system message) until it fits,
and `dropped` says how many went; a single message too long for the context is refused with a
ValueError. A reply ends at eos, at a stop string, or after `max_new_tokens` (or the context left).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..inference.sampling import SamplingParams
from ..model import Transformer
from ..tokenizers import Tokenizer
from .chat_template import ChatTemplate
from .config import ServeConfig
from .core import EngineCore
from .detokenizer import TextStream
from .scheduler import Sequence, Status

ROLES = ("system", "user", "assistant")


class ChatSession:
    def __init__(self, net: Transformer, tokenizer: Tokenizer, template: ChatTemplate, *, system: str | None = None,
                 params: SamplingParams | None = None, seed: int = 0, max_new_tokens: int = 512,
                 min_reply_tokens: int = 64, stop: tuple[str, ...] = ()) -> None:
        if max_new_tokens < 1 or min_reply_tokens < 1:
            raise ValueError(f"max_new_tokens and min_reply_tokens must be >= 1, got {max_new_tokens} and "
                             f"{min_reply_tokens}")
        self.core = EngineCore(net, ServeConfig(max_batch_size=1))
        self.tokenizer, self.template = tokenizer, template
        self.system = system
        self.params = params or SamplingParams(0.0)
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.context = net.config.max_seq_len
        self.min_reply_tokens = min(min_reply_tokens, max_new_tokens, self.context - 1)
        self.stop = stop
        self.turns: list[dict[str, Any]] = []  # user and assistant messages, oldest first
        self.dropped = 0  # exchanges dropped from the start to fit the last prompt in the context
        self.last_cached_tokens = 0  # prompt tokens of the last turn found in the KV cache

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []
        self.dropped = 0

    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's `text` and stream the assistant's reply, piece by piece; the reply joins
        the history once it has ended (also when the caller stops reading: what came so far)."""
        before = list(self.turns), self.dropped
        self.turns.append({"role": "user", "content": text})
        try:
            prompt = self._fitting_prompt()
        except ValueError:  # the message alone does not fit: the history stays as it was
            self.turns, self.dropped = before
            raise
        max_tokens = min(self.max_new_tokens, self.context - len(prompt))
        seq = Sequence(prompt, max_tokens, self.params, None if self.params.greedy else self.seed,
                       stop_ids=frozenset({self.tokenizer.eos_id}), text=TextStream(self.tokenizer, self.stop))
        self.seed += 1  # the next reply draws afresh, reproducibly
        self.core.add(seq)
        pieces: list[str] = []
        try:
            while seq.status is not Status.FINISHED:
                for out in self.core.step():
                    if out.error is not None:
                        raise RuntimeError(f"sampling failed: {out.error}")
                    if out.text:
                        pieces.append(out.text)
                        yield out.text
        finally:
            if seq.status is not Status.FINISHED:
                self.core.finish(seq, "abort")
            self.last_cached_tokens = seq.cached_tokens or 0
            self.turns.append({"role": "assistant", "content": "".join(pieces)})

    def _fitting_prompt(self) -> list[int]:
        """The rendered history's ids, the oldest exchanges dropped until the reply has room."""
        while True:
            ids = [self.tokenizer.eos_id] + self.tokenizer.encode(self.template.render(self.messages()))
            if len(ids) + self.min_reply_tokens <= self.context:
                return ids
            if len(self.turns) <= 1:
                raise ValueError(f"the message takes {len(ids)} tokens with the chat template, more than fit in the "
                                 f"model's context of {self.context} tokens with {self.min_reply_tokens} left for "
                                 f"the reply; send a shorter one")
            # Drop the oldest exchange: a user turn and the assistant's answer to it.
            drop = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:drop]
            self.dropped += 1

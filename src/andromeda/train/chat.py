"""Chat data (`objective="chat"`): conversations rendered with the chat template, the loss on the
assistant's turns only.

Each `.jsonl` record `{"messages": [{"role": ..., "content": ...}, ...]}` (the format HF TRL and
litgpt read) is rendered with the run's chat template, as the server renders a conversation, and
becomes one sequence

    eos  tokens of the rendered conversation  eos

whose targets are the tokens of the assistant's turns and, when the conversation ends with one,
the closing eos (the server and `andromeda chat` stop a reply at eos, so the model learns to end
its reply there, as the completion objective's closing eos teaches it).

The assistant's turns are found as TRL finds them in a template without generation markers: for
the assistant message i, what the template renders for messages[:i] with add_generation_prompt
(the prompt the server renders for that reply) must be a prefix of what it renders for
messages[:i + 1], itself a prefix of the whole conversation; the difference is the reply as the
model is to write it, the template's end-of-turn text included. A template whose renders are not
prefixes of each other (one that rewrites earlier turns, e.g. drops past reasoning) is refused:
its assistant turns cannot be told apart.

The text is tokenised piece by piece (up to a reply, the reply, ...): the first piece is the very
prompt the server tokenises for the first reply, and each reply's tokens are what the model is to
generate after it. With the byte tokenizer the pieces join to the tokens of the whole text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import ModelSource
from ..serve.chat_template import ChatTemplate, ChatTemplateError, find_chat_template
from ..tokenizers import Tokenizer
from .config import TrainConfig
from .sft import SFTExamples, jsonl_records

MESSAGES_FIELD = "messages"
ROLES = ("system", "user", "assistant")
RECORD_FORM = f'{{"{MESSAGES_FIELD}": [{{"role": "user", "content": ...}}, {{"role": "assistant", "content": ...}}]}}'


def load_chat_examples(files: list[Path], tokenizer: Tokenizer, template: ChatTemplate) -> SFTExamples:
    """Render and tokenise every conversation of the `.jsonl` files; errors name the file and line."""
    sequences, is_target, reply_bytes = [], [], 0
    eos = tokenizer.eos_id
    for where, record in jsonl_records(files, "chat", RECORD_FORM):
        messages = checked_messages(record, where)
        try:
            pieces = conversation_pieces(template, messages)
        except ChatTemplateError as err:
            raise ValueError(f"{where}: {err}") from None
        ids, targets = [eos], [False]
        for text, is_reply in pieces:
            tokens = tokenizer.encode(text)
            ids += tokens
            targets += [is_reply] * len(tokens)
            reply_bytes += len(text.encode("utf-8")) if is_reply else 0
        if messages[-1]["role"] == "assistant":
            ids.append(eos)
            targets.append(True)
        sequences.append(np.array(ids, dtype=np.int64))
        is_target.append(np.array(targets, dtype=bool))
    if not sequences:
        raise ValueError(f"no conversations in {', '.join(map(str, files))}; expected records {RECORD_FORM}")
    return SFTExamples(sequences, is_target, reply_bytes)


def checked_messages(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The record's messages, each with a known role and a string content, at least one of them
    the assistant's; a ValueError naming `where` (FILE:LINE) and the problem otherwise."""
    messages = record.get(MESSAGES_FIELD)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages in {MESSAGES_FIELD!r}, as in "
                         f"{RECORD_FORM}; got {json.dumps(record)[:80]!r}")
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {number} must be an object with 'role' and 'content', got "
                             f"{message!r:.80}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: message {number} has the unknown role {role!r}; the roles are "
                             f"{', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {number} ({role}) must have a string 'content', got "
                             f"{message.get('content')!r:.80}")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: the conversation has no assistant message: nothing to train on (the loss is "
                         f"on the assistant's turns)")
    return messages


def conversation_pieces(template: ChatTemplate, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is an assistant's turn) pieces, in order (module
    docstring); ChatTemplateError if the template fails, or renders turns that are not prefixes."""
    whole = template.render(messages, add_generation_prompt=False)
    pieces, end = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:index], add_generation_prompt=True)
        through = template.render(messages[: index + 1], add_generation_prompt=False)
        if not through.startswith(prompt):
            problem = (f"the prompt it renders before message {index} (add_generation_prompt=True) is not a prefix "
                       f"of what it renders through message {index}")
        elif not whole.startswith(through) or len(prompt) < end:
            problem = f"what it renders through message {index} is not a prefix of the whole conversation"
        else:
            pieces += [(whole[end : len(prompt)], False), (whole[len(prompt) : len(through)], True)]
            end = len(through)
            continue
        raise ChatTemplateError(f"the chat template cannot be trained on: {problem}, so the assistant's turns "
                                f"cannot be found; use a template that renders each turn after the earlier ones "
                                f"unchanged")
    pieces.append((whole[end:], False))
    return [(text, is_reply) for text, is_reply in pieces if text]


def run_chat_template(config: TrainConfig, init_source: ModelSource | None,
                      resume_from: ModelSource | None) -> str | None:
    """The chat template a run stores in its checkpoints (and renders chat data with): a resumed
    run's own, else --chat-template's file, else --init-from's (kept from the base), else none.
    Checked to parse where it is given or used; a ValueError naming where it came from otherwise."""
    if resume_from is not None:
        text, origin = find_chat_template(resume_from), f"the chat template of {resume_from.folder}"
    elif config.chat_template is not None:
        path = Path(config.chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template {path} does not exist (give a Jinja chat template file)")
        text, origin = path.read_text(encoding="utf-8"), f"--chat-template {path}"
    elif init_source is not None:
        text, origin = find_chat_template(init_source), f"the chat template of {init_source.folder}"
    else:
        text, origin = None, ""
    if text is None:
        if config.objective == "chat":
            has_none = f"{config.init_from} has none" if config.init_from else "a model trained from scratch has none"
            raise ValueError(f"--objective chat renders each conversation with a chat template, and {has_none}: give "
                             f"one with --chat-template FILE (Jinja, as in Hugging Face's chat_template)")
        return None
    if config.objective == "chat" or config.chat_template is not None:
        try:
            ChatTemplate(text)
        except ValueError as err:
            raise ValueError(f"{origin}: {err}") from None
    return text

"""Chat templates: messages to a prompt string, with Jinja as Hugging Face renders them.

A template comes from `--chat-template FILE`, else from the checkpoint: a `chat_template.jinja`
file (which `train --chat-template FILE` stores, listed in the manifest, and `export-hf` and
`import-hf` carry across), or a "chat_template" entry of its tokenizer_config.json (a string, or Hugging Face's list of
named templates, of which "default" is used). The template sees `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`, the functions `raise_exception`
and `strftime_now`, and the `tojson` filter, as in `transformers`' `apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..checkpoint import HF_EXPORT, ModelSource, open_model_source, verify_checkpoint
from ..folders import CheckpointError, member, read_json_object
from ..interop.hf import CHAT_TEMPLATE_FILE
from ..tokenizers import EOS_TOKEN, PAD_TOKEN, TOKENIZER_CONFIG_FILE

TEMPLATE_FILE = CHAT_TEMPLATE_FILE  # written by `train --chat-template`, `import-hf` and `export-hf`


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or is broken)."""


def find_chat_template(checkpoint: str | Path | ModelSource, path: str | Path | None = None) -> str | None:
    """The template's source: the file `path`, else the model folder's; None if there is none.

    A folder's template is one of its own files: a regular file inside the folder (a link out of
    it, a FIFO or a device is refused) and, for a checkpoint (which has a manifest), listed in its
    manifest with a matching SHA-256, so a file dropped in or swapped after the checkpoint was
    written is never served. A Hugging Face export has no manifest to check against."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {path} does not exist")
        return path.read_text()
    source = open_model_source(checkpoint, verify=False)
    folder, manifested = source.folder, source.kind != HF_EXPORT
    template_file = member(folder, TEMPLATE_FILE, what="chat template")
    if template_file.is_file():
        if manifested:
            _verify(folder, TEMPLATE_FILE)
        return template_file.read_text()
    config_file = member(folder, TOKENIZER_CONFIG_FILE)
    if config_file.is_file():
        if manifested:
            _verify(folder, TOKENIZER_CONFIG_FILE)
        template = read_json_object(config_file, "the tokenizer settings, a JSON object").get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_file}: chat_template must be a string, got {type(template).__name__}")
        return template
    return None


def _verify(checkpoint: Path, name: str) -> None:
    try:
        verify_checkpoint(checkpoint, [name])
    except CheckpointError as err:
        raise CheckpointError(f"{err}; to serve another chat template, pass --chat-template FILE") from None


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = EOS_TOKEN,
                 pad_token: str = PAD_TOKEN) -> None:
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ModuleNotFoundError("chat templates need jinja2: pip install -e '.[serve]' in the andromeda checkout "
                                      "(PyPI's andromeda is an unrelated project)") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise ValueError(f"the chat template does not parse: {error} (line {error.lineno})") from None
        self.source = source
        self.tokens = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
        self._errors = (jinja2.exceptions.TemplateError,)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        context = {**self.tokens, **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self.template.render(**context)
        except self._errors as error:
            raise ChatTemplateError(f"the chat template rejected the messages: {error}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ChatTemplateError(f"the chat template failed on the messages: {error}") from None

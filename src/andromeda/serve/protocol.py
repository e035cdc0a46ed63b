"""The wire format: OpenAI's request schemas (validated), responses, stream chunks and errors.

Requests are pydantic models in strict mode (a string is not a number, a number not a boolean);
unknown fields are ignored, as OpenAI's clients send some this server has no use for. Fields that
would change the output but are not implemented (suffix, tools) are rejected rather than ignored.
Extensions beyond OpenAI's API, as vLLM spells them: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, add_generation_prompt, chat_template_kwargs, structured_outputs (the openai client
sends them through `extra_body`).

Constrained output, on completions and chat alike (as vLLM takes it): OpenAI's `response_format`
({"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}) or
vLLM's `structured_outputs` (exactly one of json, regex, choice, grammar, json_object), never both.
Their shape is checked with the other fields; whether the schema, regex or grammar compiles is
checked by `check_unsupported` (remembered per constraint), so a bad one is a 400 naming it.

Responses are built as plain dicts: they are serialised once per token per stream.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..inference.sampling import MAX_PENALTY, SamplingParams
from ..inference.structured import OutputConstraint, validate_constraint

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_N = 128
MAX_LOGPROBS = 5  # completions: OpenAI's limit on alternatives per token
MAX_TOP_LOGPROBS = 20  # chat
# What the server itself gives the chat template: chat_template_kwargs may not set these.
TEMPLATE_ARGUMENTS = ("messages", "add_generation_prompt")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")  # structured_outputs: exactly one
# structured_outputs options accepted and without effect here: JSON is always compact, and there
# is one grammar engine to fall back from.
STRUCTURED_NO_OPS = ("disable_any_whitespace", "disable_fallback")


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(error: ValidationError | list[dict[str, Any]]) -> APIError:
    """A 400 naming the first invalid field and what it expects, from pydantic's errors."""
    errors = error.errors() if isinstance(error, ValidationError) else error
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type"):
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return APIError(f"the request body is not valid JSON: {detail}", code="invalid_json")
    if kind == "model_attributes_type" or (kind == "dict_type" and not loc):
        hint = " (sent with Content-Type: application/json)" if isinstance(first.get("input"), (bytes, str)) else ""
        return APIError(f"the request body must be a JSON object{hint}", code="invalid_body")
    param = ".".join(loc) or None
    if kind == "missing" and param is None:
        return APIError("the request body is empty: send a JSON object (Content-Type: application/json)",
                        code="invalid_body")
    if kind == "missing":
        return APIError(f"missing required parameter '{param}'", param=param, code="missing_parameter")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    got = first.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return APIError(f"invalid '{param}': {message}; got {shown}", param=param, code="invalid_value")


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM clients; usage comes at the end


class _Generation(_Strict):
    """The fields completions and chat share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0..2; 0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 keeps every token")
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description="OpenAI's: -2..2")
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description="OpenAI's: -2..2")
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM's (CTRL's): > 0; 1 is none")
    logit_bias: dict[str, float] | None = Field(None, description="OpenAI's: token id -> -100..100")
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        try:  # the one check of ids and values; the vocabulary's is the server's
            SamplingParams(logit_bias=bias)
        except ValueError as error:
            raise ValueError(str(error).removeprefix("logit_bias ")) from None
        return bias

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            response_format_constraint(value)
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            structured_outputs_constraint(value)
        return value

    @property
    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with integer ids (None when empty)."""
        return {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None

    def output_constraint(self) -> tuple[OutputConstraint, str] | None:
        """What the output must follow and the field that asked for it; None for free text."""
        if self.structured_outputs is not None:
            return structured_outputs_constraint(self.structured_outputs)
        if self.response_format is not None:
            return response_format_constraint(self.response_format)
        return None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed")
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def check_unsupported(self) -> None:
        """Reject what this server does not implement (rather than silently ignore it)."""
        if self.stream_options is not None and not self.stream:
            raise APIError("invalid 'stream_options': only allowed when 'stream' is true",
                           param="stream_options", code="invalid_value")
        self.check_constraint()

    def check_constraint(self) -> None:
        """A 400 naming the field if both ways of constraining the output are given, or if the
        schema, regex or grammar does not compile."""
        if self.structured_outputs is not None and self.response_format is not None:
            raise APIError("give at most one of 'response_format' and 'structured_outputs'",
                           param="structured_outputs", code="invalid_value")
        asked = self.output_constraint()
        if asked is None:
            return
        constraint, param = asked
        try:
            validate_constraint(constraint)
        except ImportError as error:
            raise APIError(f"'{param.partition('.')[0]}' is not supported by this server: {error}", param=param,
                           code="unsupported_parameter") from None
        except ValueError as error:
            raise APIError(f"invalid '{param}': {error}", param=param, code="invalid_value") from None


class CompletionRequest(_Generation):
    prompt: Any = Field(..., description="a string, a list of strings, a list of token ids, "
                                         "or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt: Any) -> list[str | list[int]]:
        return parse_prompt(prompt)

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("'best_of' is not supported by this server (only best_of == n)", param="best_of",
                           code="unsupported_parameter")
        if self.suffix:
            raise APIError("'suffix' is not supported by this server", param="suffix", code="unsupported_parameter")


PROMPT_FORMS = "a non-empty string, a list of strings, a list of token ids, or a list of token-id lists"


def parse_prompt(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completion request: strings, or lists of token ids."""

    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_id(x) for x in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(x, list) and all(is_id(i) for i in x)
                                                     for x in prompt):
        prompts = prompt
    else:
        raise ValueError(f"prompt must be {PROMPT_FORMS}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt must not be empty (give text or token ids)")
    return prompts


def response_format_constraint(value: dict[str, Any]) -> tuple[OutputConstraint, str] | None:
    """OpenAI's response_format as a constraint and the field holding it (None for "text");
    ValueError naming what is wrong with its shape."""
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"'type' must be one of {', '.join(RESPONSE_FORMATS)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint.json_object(), "response_format"
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError('type "json_schema" needs "json_schema": {"name": ..., "schema": {a JSON schema object}}')
    return OutputConstraint.json_schema(spec["schema"]), "response_format.json_schema.schema"


def structured_outputs_constraint(value: dict[str, Any]) -> tuple[OutputConstraint, str]:
    """vLLM's structured_outputs as a constraint and the field holding it; ValueError naming
    what is wrong with its shape."""
    unknown = sorted(set(value) - set(STRUCTURED_KINDS) - set(STRUCTURED_NO_OPS))
    if unknown:
        raise ValueError(f"unsupported option {unknown[0]!r}; expected exactly one of {', '.join(STRUCTURED_KINDS)}")
    given = [kind for kind in STRUCTURED_KINDS if value.get(kind) not in (None, False)]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(STRUCTURED_KINDS)}")
    kind, spec = given[0], value[given[0]]
    if kind == "json" and not isinstance(spec, (dict, str)):
        raise ValueError("'json' must be a JSON schema (an object, or its JSON text)")
    if kind in ("regex", "grammar") and not isinstance(spec, str):
        raise ValueError(f"'{kind}' must be a string")
    if kind == "json_object" and spec is not True:
        raise ValueError("'json_object' must be true")
    make = {"json": OutputConstraint.json_schema, "regex": OutputConstraint.regex, "choice": OutputConstraint.choice,
            "grammar": OutputConstraint.grammar, "json_object": lambda _: OutputConstraint.json_object()}[kind]
    return make(spec), f"structured_outputs.{kind}"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # extra fields go to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in TEMPLATE_ARGUMENTS:
            if key in (kwargs or {}):
                raise ValueError(f"'{key}' cannot be set in chat_template_kwargs: it is the request's own "
                                 f"'{key}' field")
        return kwargs

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise APIError("'tools' are not supported by this server", param="tools", code="unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise APIError("invalid 'top_logprobs': requires 'logprobs' to be true", param="top_logprobs",
                           code="invalid_value")

    def rendered_messages(self) -> list[dict[str, Any]]:
        """Messages as the template sees them: content as one string."""
        return [{**m.model_dump(exclude_none=True), "content": m.text()} for m in self.messages]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages to render first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # the document-start eos the server puts before a prompt
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# --------------------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens`: prompt tokens reused from the prefix cache, not computed
    (None: the prompts were not looked up, and prompt_tokens_details is left out)."""
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
                      stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion(id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage_: dict[str, Any] | None, object: str = "text_completion") -> dict[str, Any]:
    return {"id": id, "object": object, "created": created, "model": model, "choices": choices,
            "usage": usage_}


def chat_choice(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
                stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_chunk_choice(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
                      finish_reason: str | None, stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def model_card(name: str, created: int, max_model_len: int, root: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "andromeda", "root": root,
            "max_model_len": max_model_len}

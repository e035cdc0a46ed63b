"""Constrained output and logit_bias: an untrained model's output follows a JSON schema, a regex,
a choice or a grammar; the grammar's mask per row; logit_bias in sampling; and the server's
parsing of response_format, structured_outputs and logit_bias into 400s that name the field."""

from __future__ import annotations

import copy
import json
import re
import sys
import threading

import pytest
import torch
from pydantic import ValidationError

from andromeda import Andromeda
from andromeda.inference.generate import generate, stream_text
from andromeda.inference.sampling import SamplingParams, apply_logit_bias
from andromeda.inference import structured
from andromeda.inference.structured import (
    OutputConstraint,
    accept_tokens,
    apply_bitmask,
    apply_constraints,
    grammar_bitmask,
    grammar_matcher,
    unpack_bitmask,
    validate_constraint,
)
from andromeda.serve.config import ServeConfig
from andromeda.serve.core import EngineCore
from andromeda.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from andromeda.serve.scheduler import Sequence
from andromeda.tokenizers import ByteTokenizer, load_tokenizer, train_bpe
from helpers import CORPUS_TEXT

VOCAB = 384  # the model's rows: more than the BPE's 300 tokens, as checkpoints pad their embedding
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llguidance():
    return pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def net():
    """An untrained tiny model: whatever it prefers, only the grammar shapes its output."""
    torch.manual_seed(0)
    return Andromeda.from_config("tiny", num_tokens=VOCAB).Andromeda


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE loaded back from its tokenizer.json, as a checkpoint's tokenizer is."""
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe([CORPUS_TEXT, '{"name": "fox", "age": 12, "ok": true} yes no maybe'], vocab_size=300).save(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=["bpe", "byte"])
def tokenizer(request, bpe):
    return bpe if request.param == "bpe" else ByteTokenizer()


def constrained(net, tokenizer, constraint, temperature, new=200):
    """The decoded output of two ragged rows and whether each stopped before `new` tokens."""
    prompts = [[tokenizer.eos_id, *tokenizer.encode("the quick fox")], [tokenizer.eos_id]]
    device = net.token_emb.weight.device
    out = generate(net, prompts, new, temperature=temperature, constraint=constraint, tokenizer=tokenizer,
                   generator=torch.Generator(device).manual_seed(0)).cpu()
    return [tokenizer.decode(row) for row in out], [bool((row == tokenizer.eos_id).any()) for row in out]


def check_person(value) -> None:
    """PERSON's constraints, checked by hand (jsonschema is not a dependency)."""
    assert isinstance(value, dict) and set(value) <= {"name", "age", "tags", "ok"}
    assert {"name", "age", "ok"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert type(value["ok"]) is bool
    assert value.get("tags", []) == [t for t in value.get("tags", []) if t in ("a", "b")][:3]


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_validates_and_ends(llguidance, net, tokenizer, temperature):
    texts, ended = constrained(net, tokenizer, OutputConstraint.json_schema(PERSON), temperature)
    for text in texts:
        check_person(json.loads(text))
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)), "no whitespace between JSON tokens"
    assert all(ended), "a bounded schema ends (its rows padded with eos) well within 200 tokens"


def test_json_object_output_is_a_json_object(llguidance, net, bpe):
    texts, ended = constrained(net, bpe, OutputConstraint.json_object(), 1.0, new=300)
    for text, stopped in zip(texts, ended):
        if stopped:  # an object of any depth may outgrow the budget; those that end must parse
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


def test_regex_output_full_matches(llguidance, net, tokenizer, device):
    pattern = r"(cat|dog)-[0-9]{2,4}\.(a|b)+"
    on_device = copy.deepcopy(net).to(device)
    for temperature in (0.0, 1.0):
        texts, _ = constrained(on_device, tokenizer, OutputConstraint.regex(pattern), temperature, new=60)
        assert all(re.fullmatch(pattern, t) for t in texts), texts


def test_choice_output_is_one_of_the_choices(llguidance, net, tokenizer):
    choices = ["yes", "no", "maybe not"]
    texts, ended = constrained(net, tokenizer, OutputConstraint.choice(choices), 1.0, new=20)
    assert all(t in choices for t in texts) and all(ended), texts


def test_gbnf_and_lark_grammars(llguidance, net, bpe):
    for grammar in ('root ::= "(" [a-c]{1,6} ")" ("!" | "?")', 'start: "(" /[a-c]{1,6}/ ")" ("!" | "?")'):
        texts, _ = constrained(net, bpe, OutputConstraint.grammar(grammar), 1.0, new=30)
        assert all(re.fullmatch(r"\([a-c]{1,6}\)[!?]", t) for t in texts), texts


def test_stream_text_follows_the_constraint(llguidance, net, bpe):
    on_off = OutputConstraint.choice(["on", "off"])
    text = "".join(stream_text(net, bpe, "hello", 20, temperature=1.0, constraint=on_off,
                               generator=torch.Generator().manual_seed(0)))
    assert text in ("on", "off")


def test_a_constraint_needs_its_tokenizer_and_a_valid_grammar(llguidance, net, bpe):
    with pytest.raises(ValueError, match="tokenizer"):
        generate(net, [[1, 2]], 4, constraint=OutputConstraint.regex("a+"))
    with pytest.raises(TypeError, match="OutputConstraint"):
        generate(net, [[1, 2]], 4, constraint={"regex": "a+"}, tokenizer=bpe)
    with pytest.raises(ValueError, match="unclosed group"):
        generate(net, [[1, 2]], 4, constraint=OutputConstraint.regex("a(b"), tokenizer=bpe)


# ----------------------------------------------------------------------------- matchers


def test_mask_allows_only_eos_once_complete_and_never_padding_ids(llguidance, bpe):
    matcher = grammar_matcher(OutputConstraint.choice(["yes"]), bpe)
    allowed = matcher.allowed(VOCAB)
    assert allowed.shape == (VOCAB,) and not allowed[bpe.vocab_size :].any(), "ids past the tokenizer are masked"
    assert not allowed[bpe.eos_id], "eos is not allowed before the grammar is complete"
    for token in bpe.encode("yes"):
        assert not matcher.is_finished()
        matcher.accept(token)
    assert matcher.is_finished()
    assert matcher.allowed(VOCAB).nonzero().flatten().tolist() == [bpe.eos_id]


def test_apply_constraints_masks_each_row_by_its_own_matcher(llguidance, bpe):
    digits = grammar_matcher(OutputConstraint.regex("[0-9]+"), bpe)
    letters = grammar_matcher(OutputConstraint.regex("[a-z]"), bpe)
    logits = torch.randn(3, VOCAB)
    masked = apply_constraints(logits, [digits, None, letters])
    assert torch.equal(masked[1], logits[1]), "a row without a matcher is untouched"
    for row, allowed in ((0, "0123456789"), (2, "abcdefghijklmnopqrstuvwxyz")):
        kept = masked[row].isfinite().nonzero().flatten().tolist()
        assert kept and all(bpe.decode([t]) and set(bpe.decode([t])) <= set(allowed) for t in kept)
    finished = accept_tokens([digits, None, letters], masked.argmax(dim=-1))
    assert finished.tolist() == [False, False, True], "one letter completes [a-z]; digits may go on"
    with pytest.raises(ValueError, match="does not satisfy the grammar"):
        grammar_matcher(OutputConstraint.regex("[0-9]+"), bpe).accept(bpe.encode("x")[0])


def test_rollback_restores_the_earlier_mask(llguidance, bpe):
    matcher = grammar_matcher(OutputConstraint.json_schema(PERSON), bpe)
    before = matcher.allowed(VOCAB)
    tokens = bpe.encode('{"name":"fo')
    for token in tokens:
        matcher.accept(token)
    assert not torch.equal(matcher.allowed(VOCAB), before)
    matcher.rollback(len(tokens))
    assert torch.equal(matcher.allowed(VOCAB), before)
    digits = grammar_matcher(OutputConstraint.regex("[0-9]+"), ByteTokenizer())
    assert digits.valid_prefix(b"12x3") == 2 and digits.valid_prefix(b"123") == 3
    assert not digits.allowed(VOCAB)[ByteTokenizer.eos_id], "valid_prefix accepted nothing: eos is not yet allowed"


def test_packed_bitmask_holds_each_rows_tokens_bit_by_bit(llguidance, bpe):
    """Bit t % 32 of word t // 32 is token t: a free row has every bit, a grammar row only its
    tokens, never ids past the tokenizer's; applying it puts -inf where the bit is clear. The
    thread pool (for accelerators) computes the same bits."""
    digits = grammar_matcher(OutputConstraint.regex("[0-9]+"), bpe)
    letters = grammar_matcher(OutputConstraint.regex("[a-z]"), bpe)
    assert grammar_bitmask([None, None], VOCAB) is None, "free text computes no mask"
    bitmask = grammar_bitmask([digits, None, letters], VOCAB)
    assert bitmask.dtype == torch.int32 and bitmask.shape == (3, VOCAB // 32)
    assert torch.equal(grammar_bitmask([digits, None, letters], VOCAB, parallel=True), bitmask)
    words = bitmask.tolist()
    bits = [[(words[row][t // 32] >> (t % 32)) & 1 == 1 for t in range(VOCAB)] for row in range(3)]
    assert all(bits[1]), "a row without a grammar allows every id"
    for row, alphabet in ((0, "0123456789"), (2, "abcdefghijklmnopqrstuvwxyz")):
        kept = [t for t in range(VOCAB) if bits[row][t]]
        assert kept and all(t < bpe.vocab_size and set(bpe.decode([t])) <= set(alphabet) for t in kept)
    assert torch.equal(unpack_bitmask(bitmask, VOCAB), torch.tensor(bits))
    logits = torch.randn(3, VOCAB)
    masked = apply_bitmask(logits, bitmask)
    assert torch.equal(masked.isfinite(), torch.tensor(bits)) and torch.equal(masked[torch.tensor(bits)],
                                                                            logits[torch.tensor(bits)])


def test_the_engine_masks_on_its_own_thread_and_draws_generates_tokens(llguidance, net, bpe, monkeypatch):
    """Rows under a regex, a schema, choices and none, batched by the server's engine on the CPU:
    the masks are computed on the engine's thread, one row after another (no thread to hand them
    to and back, llguidance's pool left to accelerators: on the CPU both cost more than the masks),
    and every row gets the tokens `generate` gives it alone."""
    monkeypatch.setattr(structured, "_executor", lambda: pytest.fail("llguidance's thread pool used on the CPU"))
    constraints = [OutputConstraint.regex("[a-z ]{3,30}"), OutputConstraint.json_schema(PERSON), None,
                   OutputConstraint.choice(["yes", "no", "maybe"])]
    prompts = [[bpe.eos_id, *bpe.encode(text)] for text in ("the quick fox", "a", "the", "yes or")]
    core = EngineCore(net, ServeConfig(max_batch_size=4))
    seqs = [Sequence(prompt, 40, SamplingParams(0), matcher=constraint and grammar_matcher(constraint, bpe))
            for prompt, constraint in zip(prompts, constraints)]
    threads = threading.active_count()
    for seq in seqs:
        core.add(seq)
    for _ in range(100):
        if not core.has_work:
            break
        core.step()
    assert not core.has_work and threading.active_count() == threads, "a thread was started"
    assert [seq.finish_reason for seq in seqs] == ["stop", "stop", "length", "stop"]
    for seq, prompt, constraint in zip(seqs, prompts, constraints):
        alone = generate(net, torch.tensor(prompt), 40, temperature=0, constraint=constraint, tokenizer=bpe)[0]
        n = len(seq.output)
        assert seq.output == alone[:n].tolist() and (alone[n:] == bpe.eos_id).all(), "then eos (padding) only"


@pytest.mark.parametrize("constraint, problem", [
    (lambda: OutputConstraint.regex("a(b"), "(?s)invalid regex.*unclosed group"),
    (lambda: OutputConstraint.regex("(?=a)b"), "look-around"),
    (lambda: OutputConstraint.json_schema({"type": "objec"}), "(?s)invalid JSON schema.*objec"),
    (lambda: OutputConstraint.json_schema({"type": "string", "format": "nope"}), "Unknown format"),
    (lambda: OutputConstraint.grammar("start: foo"), "(?s)invalid grammar.*foo"),
    (lambda: OutputConstraint.grammar('root ::= "a'), "invalid grammar"),
])
def test_invalid_constraints_raise_value_errors_naming_the_problem(llguidance, constraint, problem):
    with pytest.raises(ValueError, match=problem):
        validate_constraint(constraint())


@pytest.mark.parametrize("make, problem", [
    (lambda: OutputConstraint.choice([]), "non-empty list"),
    (lambda: OutputConstraint.choice(["a", 1]), "list of strings"),
    (lambda: OutputConstraint.json_schema("{oops"), "not valid JSON"),
    (lambda: OutputConstraint.json_schema("[1]"), "must be a JSON object"),
    (lambda: OutputConstraint.grammar(" "), "non-empty"),
])
def test_constraint_shapes_are_checked_on_construction(make, problem):
    with pytest.raises(ValueError, match=problem):
        make()


def test_missing_llguidance_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(ImportError, match=re.escape("needs llguidance: pip install -e '.[structured]'")):
        validate_constraint(OutputConstraint.regex("never-validated-before"))
    error = parse(structured_outputs={"regex": "nor-this-one"})
    assert (error.status, error.code, error.param) == (400, "unsupported_parameter", "structured_outputs.regex")
    assert "[structured]" in error.message


# ----------------------------------------------------------------------------- logit_bias


def test_logit_bias_forces_and_bans_tokens_under_greedy(net):
    prompt = [[5, 6, 7]]
    plain = generate(net, prompt, 6, temperature=0)
    forced = generate(net, prompt, 6, temperature=0, logit_bias={42: 100})
    assert (forced == 42).all() and not (plain == 42).all()
    banned = generate(net, prompt, 6, temperature=0, logit_bias={str(t): -100 for t in plain.unique().tolist()})
    assert not torch.isin(banned, plain.unique()).any()
    sampled = generate(net, prompt, 20, temperature=1.0, logit_bias={"42": 100},
                       generator=torch.Generator().manual_seed(0))
    assert (sampled == 42).all()


def test_logit_bias_is_added_to_the_logits():
    params = SamplingParams(0.0, logit_bias={"3": -100, 1: 2.5})
    assert params.logit_bias == ((1, 2.5), (3, -100.0))
    biased = apply_logit_bias(torch.zeros(2, 5), params)
    assert biased.tolist() == [[0, 2.5, 0, -100, 0]] * 2


@pytest.mark.parametrize("bias, problem", [
    ({"5": 100.5}, r"\[-100, 100\].*100.5"),
    ({"5": float("nan")}, r"\[-100, 100\]"),
    ({"-1": 1}, "token ids.*'-1'"),
    ({"x": 1}, "token ids.*'x'"),
    ([1, 2], "map token ids"),
])
def test_bad_logit_bias_is_a_value_error_naming_it(bias, problem):
    with pytest.raises(ValueError, match=problem):
        SamplingParams(logit_bias=bias)


def test_logit_bias_ids_past_the_vocabulary_are_refused(net):
    with pytest.raises(ValueError, match=rf"logit_bias token id {VOCAB} is out of range \[0, {VOCAB}\)"):
        generate(net, [[1, 2]], 2, logit_bias={VOCAB: 1})


# ----------------------------------------------------------------------------- server requests


def parse(model=ChatCompletionRequest, **fields):
    """(constraint, its field) and token_bias of a request, or the APIError it is answered with."""
    base = {"messages": [{"role": "user", "content": "hi"}]} if model is ChatCompletionRequest else {"prompt": "hi"}
    try:
        body = model.model_validate({**base, **fields})
        body.check_unsupported()
    except ValidationError as error:
        return validation_error(error)
    except APIError as error:
        return error
    return body.output_constraint(), body.token_bias


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_requests_carry_response_format_and_structured_outputs(llguidance, model):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert parse(model, response_format={"type": "text"}) == (None, None)
    json_object = parse(model, response_format={"type": "json_object"})[0]
    assert json_object == (OutputConstraint.json_object(), "response_format")
    asked = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert parse(model, response_format=asked)[0] == (OutputConstraint.json_schema(schema),
                                                      "response_format.json_schema.schema")
    cases = {"json": (schema, OutputConstraint.json_schema(schema)), "regex": ("a+", OutputConstraint.regex("a+")),
             "choice": (["x", "y"], OutputConstraint.choice(["x", "y"])),
             "grammar": ('root ::= "a"', OutputConstraint.grammar('root ::= "a"'))}
    for kind, (value, expected) in cases.items():
        assert parse(model, structured_outputs={kind: value})[0] == (expected, f"structured_outputs.{kind}")
    assert parse(model, logit_bias={"5": 100, "7": -100.0}) == (None, {5: 100.0, 7: -100.0})


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": {"type": "xml"}}, "response_format", "'type' must be one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs \"json_schema\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objec"}}}},
     "response_format.json_schema.schema", "invalid JSON schema: Invalid type: objec"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar", "unknown name"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "unsupported option"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "at most one of 'response_format' and 'structured_outputs'"),
    ({"logit_bias": {"5": 101}}, "logit_bias", r"values must be numbers in \[-100, 100\]"),
    ({"logit_bias": {"five": 1}}, "logit_bias", "keys must be token ids"),
])
def test_bad_constraint_fields_are_400s_naming_the_field(llguidance, fields, param, message):
    error = parse(**fields)
    assert isinstance(error, APIError), error
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")
    assert re.search(message, error.message), error.message


def test_generate_command_follows_a_regex_or_a_schema_and_refuses_bad_ones(llguidance, tmp_path, capsys):
    from andromeda.checkpoint import save_pretrained
    from andromeda.cli import main
    from helpers import random_net

    save_pretrained(random_net(), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    base = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--max-new-tokens", "60"]
    assert main([*base, "--regex", "[a-z]{3}-[0-9]{2}", "--seed", "4"]) == 0
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", capsys.readouterr().out[:-1])
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                      "required": ["n"], "additionalProperties": False}))
    assert main([*base, "--json-schema", str(tmp_path / "schema.json"), "--temperature", "0"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out[:-1])["n"], int)
    assert main([*base, "--regex", "(unclosed"]) == 1
    assert "--regex:" in capsys.readouterr().err
    assert main([*base, "--json-schema", str(tmp_path / "missing.json")]) == 1
    assert "--json-schema: cannot read" in capsys.readouterr().err
    assert main([*base, "--regex", "a+", "--speculative", "ngram"]) == 1
    assert "--speculative does not support --regex" in capsys.readouterr().err


def test_the_server_compiles_a_new_grammar_off_its_event_loop_and_copies_a_known_one_on_it(llguidance, bpe,
                                                                                             monkeypatch):
    """A grammar's first compile (up to seconds) goes to a thread; once compiled, a request's
    matchers are copies made on the event loop, without a thread hop per request."""
    import asyncio
    import types

    from andromeda.serve import prompts

    hops = []
    real_to_thread = asyncio.to_thread
    monkeypatch.setattr(prompts.asyncio, "to_thread", lambda f, *a: hops.append(f) or real_to_thread(f, *a))
    body = CompletionRequest.model_validate({"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "required": ["z"],
                                                                         "properties": {"z": {"type": "integer"}}}}}})
    constraint = body.output_constraint()[0]
    ctx = types.SimpleNamespace(tokenizer=bpe)
    assert not structured.grammar_is_compiled(constraint, bpe)
    first = asyncio.run(prompts.matchers(ctx, body, 2))
    assert len(hops) == 1 and structured.grammar_is_compiled(constraint, bpe)
    again = asyncio.run(prompts.matchers(ctx, body, 2))
    assert len(hops) == 1, "a compiled grammar made a thread hop"
    assert len(first) == len(again) == 2 and again[0] is not again[1], "each choice has its own matcher"
    assert torch.equal(again[0].allowed(VOCAB), first[0].allowed(VOCAB))

"""Chat data and the chat template a checkpoint keeps: `train --objective chat` (messages rendered
with the template, the loss on the assistant's turns only), `train --chat-template FILE` (stored
in the checkpoints, kept by a fine-tune), export-hf and import-hf carrying it across."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from andromeda import Andromeda, cli
from andromeda.checkpoint import MANIFEST_FILE, latest_checkpoint, load_transformer, save_pretrained
from andromeda.inference.generate import generate
from andromeda.model import IGNORE_INDEX
from andromeda.serve.chat_template import ChatTemplate, find_chat_template
from andromeda.serve.prompts import render_chat
from andromeda.serve.protocol import APIError
from andromeda.tokenizers import ByteTokenizer
from andromeda.train import train
from andromeda.train.chat import load_chat_examples
from andromeda.train.sft import example_rows
from helpers import tiny_train_config

pytest.importorskip("jinja2")

# Each turn as <role>content|, and the reply's opening when a reply is asked for.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
COLOURS = [("snow", "white"), ("coal", "black"), ("grass", "green"), ("sky", "blue")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture
def colours(tmp_path):
    return write_jsonl(tmp_path / "colours.jsonl", [
        {"messages": [{"role": "user", "content": f"{thing}?"}, {"role": "assistant", "content": colour}]}
        for thing, colour in COLOURS])


def test_the_targets_are_exactly_the_assistants_turns(tmp_path):
    tokenizer = ByteTokenizer()
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    examples = load_chat_examples([data], tokenizer, ChatTemplate(TEMPLATE))
    inputs, targets = example_rows(examples, np.array([0]), seq_len=80, pad_id=tokenizer.pad_id)
    # By hand: the reply is what follows the prompt the server renders for it, end-of-turn included.
    before_first, first = "<system>be brief|<user>hi|<assistant>", "hello|"
    between, second = "<user>bye|<assistant>", "ciao|"
    whole = before_first + first + between + second
    assert inputs[0].tolist() == [tokenizer.eos_id, *whole.encode()] + [tokenizer.pad_id] * (79 - len(whole))
    wanted = ([IGNORE_INDEX] * len(before_first) + list(first.encode()) + [IGNORE_INDEX] * len(between)
              + list(second.encode()) + [tokenizer.eos_id])  # the closing eos: where the reply stops
    assert targets[0].tolist() == wanted + [IGNORE_INDEX] * (80 - len(wanted))
    assert examples.target_bytes == len(first) + len(second)


def test_a_chat_run_learns_the_replies_and_its_checkpoints_keep_the_template(tmp_path, corpus, colours,
                                                                             template_file):
    config = tiny_train_config(tmp_path, colours, objective="chat", chat_template=str(template_file), max_steps=40,
                               batch_size=8, seq_len=40, lr=1e-2, warmup_steps=4, eval_every=40, save_every=40)
    result = train(config)
    evals = [e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if e["type"] == "eval"]
    assert evals[0]["tokens"] == sum(len(colour) + 2 for _, colour in COLOURS)  # "colour|" and the closing eos
    assert evals[0]["loss"] > 4 and result.eval["loss"] < 0.2 * evals[0]["loss"]  # nats per reply token
    net, tokenizer = load_transformer(result.checkpoint), ByteTokenizer()
    for thing, _ in COLOURS:  # prompted as the server prompts, it answers a colour and stops at eos
        prompt = torch.tensor([tokenizer.eos_id, *f"<user>{thing}?|<assistant>".encode()])
        reply = generate(net, prompt, 8, temperature=0, eos_token=tokenizer.eos_id)[0].tolist()
        assert reply[-1] == tokenizer.eos_id and tokenizer.decode(reply[:-1]) in {f"{c}|" for _, c in COLOURS}
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert "chat_template.jinja" in json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert find_chat_template(checkpoint) == TEMPLATE  # what serve and chat use by default
    # A fine-tune of it keeps the template; --chat-template replaces it (here on plain text: kept only).
    tune = dict(preset=None, model_overrides={}, init_from=str(checkpoint), max_steps=1, eval_batches=0)
    kept = train(tiny_train_config(tmp_path, colours, out=str(tmp_path / "kept"), objective="chat", **tune))
    assert find_chat_template(kept.checkpoint) == TEMPLATE
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    replaced = train(tiny_train_config(tmp_path, corpus, out=str(tmp_path / "replaced"), chat_template=str(other),
                                       **tune))
    assert find_chat_template(replaced.checkpoint) == other.read_text()


def test_export_and_import_keep_the_template_and_transformers_renders_it_alike(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    save_pretrained(Andromeda.from_config("tiny").Andromeda, tmp_path / "ckpt", ByteTokenizer(), chat_template=template)
    assert cli.main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == template
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == template
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    for prompt in (True, False):
        assert (hf_tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=prompt)
                == ChatTemplate(template).render(CONVERSATION[:4], add_generation_prompt=prompt))
    assert cli.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "chat_template.jinja" in json.loads((tmp_path / "back" / MANIFEST_FILE).read_text())["files"]
    assert find_chat_template(tmp_path / "back") == template


# From the third message on, the reply's opening (">") is not rendered once the reply is there.
NOT_A_PREFIX = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt and messages | length > 2 %}>{% endif %}")


@pytest.mark.parametrize("row, template, message", [
    ({"prompt": "a", "completion": "b"}, TEMPLATE, r"expected a non-empty list of messages in 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, TEMPLATE, r"message 0 has the unknown role 'robot'; "
                                                                  r"the roles are system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, TEMPLATE,
     r"the conversation has no assistant message: nothing to train on"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, TEMPLATE,
     r"message 0 \(user\) must have a string 'content'"),
    ({"messages": CONVERSATION}, "{% if messages | length > 3 %}{{ raise_exception('at most 3 messages') }}{% endif %}"
     + TEMPLATE, r"the chat template rejected the messages: at most 3 messages"),
    ({"messages": CONVERSATION}, NOT_A_PREFIX,
     r"the chat template cannot be trained on: the prompt it renders before message 4 .* is not a prefix"),
], ids=["no-messages", "unknown-role", "no-assistant", "content-not-a-string", "template-raises", "not-a-prefix"])
def test_bad_conversations_name_the_file_and_line(tmp_path, row, template, message):
    good = {"messages": CONVERSATION[1:3]}
    data = write_jsonl(tmp_path / "chat.jsonl", [good, row])
    with pytest.raises(ValueError, match=rf"{data}:2: {message}"):
        load_chat_examples([data], ByteTokenizer(), ChatTemplate(template))


def test_a_chat_run_without_a_template_says_how_to_give_one(tmp_path, colours, template_file):
    with pytest.raises(ValueError, match=r"--objective chat renders each conversation with a chat template.*"
                                         r"--chat-template FILE"):
        train(tiny_train_config(tmp_path, colours, objective="chat"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=rf"--chat-template {broken}: the chat template does not parse"):
        train(tiny_train_config(tmp_path, colours, objective="chat", chat_template=str(broken)))


def test_the_servers_missing_template_error_names_the_supported_ways():
    ctx = SimpleNamespace(chat_template=None)
    with pytest.raises(APIError, match=r"serve.* --chat-template FILE.*andromeda train --chat-template FILE"):
        asyncio.run(render_chat(ctx, [{"role": "user", "content": "hi"}], True, None))

"""`andromeda chat` and its library side, `serve.chat.ChatSession`: replies equal `generate` on the
rendered history, the history's KV cache is reused from turn to turn, old turns are dropped to
fit the context, and the command reads a scripted conversation from stdin."""

from __future__ import annotations

import io

import pytest
import torch

from andromeda.checkpoint import save_pretrained
from andromeda.cli import main
from andromeda.inference.generate import generate
from andromeda.serve.chat import ChatSession
from andromeda.tokenizers import ByteTokenizer
from helpers import random_net

pytest.importorskip("jinja2")
from andromeda.serve.chat_template import ChatTemplate  # noqa: E402

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def expected_reply(net, messages: list[dict], new: int) -> str:
    """Greedy `generate` over the rendered history, cut at eos: what a reply must be."""
    ids = [EOS] + TOKENIZER.encode(ChatTemplate(TEMPLATE).render(messages))
    out = generate(net, torch.tensor(ids), new, temperature=0)[0].tolist()
    return TOKENIZER.decode(out[: out.index(EOS)] if EOS in out else out)


def test_replies_equal_generate_on_the_history_and_reuse_its_cache():
    net = random_net().eval()
    session = ChatSession(net, TOKENIZER, ChatTemplate(TEMPLATE), system="Be brief.", max_new_tokens=12)
    first = "".join(session.reply("Hello there"))
    assert first == expected_reply(net, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello there"}], 12)
    history = session.messages()
    second = "".join(session.reply("And then?"))
    assert second == expected_reply(net, history + [{"role": "user", "content": "And then?"}], 12)
    # Turn two read only what turn one had not: its prompt up to the end of the first reply.
    prefix = [EOS] + TOKENIZER.encode(ChatTemplate(TEMPLATE).render(history, add_generation_prompt=False))
    assert session.last_cached_tokens >= len(prefix) - len(TOKENIZER.encode(first)) - 2 > 0
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]


def test_old_turns_are_dropped_to_fit_and_a_message_too_long_is_refused():
    net = random_net(max_seq_len=96).eval()
    session = ChatSession(net, TOKENIZER, ChatTemplate(TEMPLATE), system="S", max_new_tokens=8, min_reply_tokens=8)
    for i in range(4):
        "".join(session.reply(f"message number {i} " + "x" * 20))
    assert session.dropped >= 1 and session.messages()[0] == {"role": "system", "content": "S"}
    assert session.messages()[1]["role"] == "user"  # exchanges go whole
    before = session.messages()
    with pytest.raises(ValueError, match="more than fit in the model's context of 96 tokens"):
        list(session.reply("y" * 200))
    assert session.messages() == before


def test_the_chat_command_reads_a_scripted_conversation(tmp_path, monkeypatch, capsys):
    net = random_net().eval()
    save_pretrained(net, tmp_path / "ckpt", tokenizer=TOKENIZER)
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nHi\n/exit\nnot read\n"))
    code = main(["chat", "--checkpoint", str(tmp_path / "ckpt"), "--chat-template", str(tmp_path / "chat.jinja"),
                 "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    reply = expected_reply(net, [{"role": "user", "content": "Hi"}], 6)
    assert captured.out == f"{reply}\n{reply}\n" and "starts over" in captured.err
    # No template anywhere: the error names the way to give one.
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]) == 1
    assert "--chat-template FILE" in capsys.readouterr().err

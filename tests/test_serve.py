"""`andromeda serve`: a real server process on 127.0.0.1, real clients (the official openai client,
plain HTTP), a tiny checkpoint trained here so that its text is readable and depends on the prompt.

Greedy requests return exactly what `generate(..., temperature=0)` returns, alone or among 15
other concurrent requests. Batched products are not bit-identical to a single row's (other
kernel blocking, a padded prefill chunk, keys read from a cache slot), so logits differ in the
last bits (~1e-6 here); greedy can only change where the top two logits are that close. The test
therefore uses prompts whose reference continuation keeps every step's top-two gap above
MIN_MARGIN (1e-3, far above the noise), checked before the comparison, and then demands exact
equality: near-ties are excluded by construction, not by tolerance.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from andromeda import Andromeda  # noqa: E402
from andromeda.checkpoint import load_transformer, save_pretrained  # noqa: E402
from andromeda.inference.generate import generate  # noqa: E402
from andromeda.tokenizers import ByteTokenizer  # noqa: E402
from helpers import child_env, free_port  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. ", "Pack my box with five dozen liquor jugs! ",
         "How vexingly quick daft zebras jump; ", "Sphinx of black quartz, judge my vow. "]
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
                 "{% else %}{{ message['content'] }}{% endif %}{% endfor %}")
MIN_MARGIN = 1e-3
TIMEOUT = 30.0  # seconds, for every request
TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny preset trained for a few seconds on four pangrams, one document each: eos, the
    pangram, eos, the next pangram, ... So it continues a pangram's start and then ends it."""
    torch.manual_seed(0)
    model = Andromeda.from_config("tiny")
    rows = [sum(([EOS] + TOKENIZER.encode(TEXTS[(i + j) % 4]) for j in range(4)), []) for i in range(4)]
    length = max(map(len, rows))
    tokens = torch.tensor([row + [EOS] * (length - len(row)) for row in rows])
    targets = torch.tensor([row[1:] + [-100] * (length - len(row) + 1) for row in rows])  # padding ignored
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model.Andromeda(tokens, targets=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"the test model did not learn its texts (loss {loss.item():.3f})"
    folder = tmp_path_factory.mktemp("serve") / "tiny-pangrams"
    save_pretrained(model.Andromeda, folder, tokenizer=TOKENIZER)
    (folder.parent / "chat.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def net(checkpoint):
    return load_transformer(checkpoint)


class Server:
    """`python -m andromeda serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = checkpoint.parent / f"server-{self.port}.log"
        env = child_env(PYTHONUNBUFFERED="1")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "andromeda", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
                 "--threads", "1", *options], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=TIMEOUT).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                name = re.sub(r',?model_name="[^"]*"', "", name).replace("{,", "{").replace("{}", "")
                values[name] = float(value)
        return values


@pytest.fixture(scope="module")
def server(checkpoint):
    """The main server: 16 slots, the chat template given by file."""
    process = Server(checkpoint, "--chat-template", str(checkpoint.parent / "chat.jinja"))
    try:
        process.wait_ready()
        yield process
    finally:
        code = process.stop()
    assert code == 0, f"SIGINT should stop the server with exit code 0, got {code}:\n{process.output()}"


@pytest.fixture(scope="module")
def small_server(checkpoint):
    """A server with an API key, one slot and a queue of one, and no chat template."""
    process = Server(checkpoint, "--api-key", "sekret", "--max-batch-size", "1", "--max-queue", "1",
                     "--served-model-name", "tiny")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def reference(net, prompt: str | list[int], max_tokens: int, **sampling) -> tuple[list[int], str]:
    """What `andromeda generate` gives: token ids up to and including eos, and their text."""
    ids = [EOS] + TOKENIZER.encode(prompt) if isinstance(prompt, str) else list(prompt)
    sampling.setdefault("temperature", 0)
    out = generate(net, torch.tensor(ids), max_tokens, eos_token=EOS, **sampling)[0].tolist()
    if EOS in out:
        out = out[: out.index(EOS) + 1]
    return out, TOKENIZER.decode(out)


def greedy_margin(net, prompt_ids: list[int], output: list[int]) -> float:
    """The smallest gap between the two largest logits over the steps that chose `output`."""
    with torch.no_grad():
        logits = net(torch.tensor([prompt_ids + output]))[0, len(prompt_ids) - 1 : -1]  # (L, V)
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def post(server, path: str, body=None, *, content: bytes | None = None, headers=None) -> httpx.Response:
    if body is not None:  # ASCII JSON, so strings that are not valid Unicode can be sent too
        content, headers = json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=TIMEOUT)


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of a complete SSE response, then "[DONE]"."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------------------- the openai client


def test_completion_equals_generate(server, client, net):
    prompt = "The quick"
    result = client.completions.create(model="tiny-pangrams", prompt=prompt, max_tokens=20, temperature=0)
    ids, text = reference(net, prompt, 20)
    choice = result.choices[0]
    assert choice.text == text and text.startswith(" brown fox")
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == 1 + len(prompt) and result.usage.completion_tokens == 20
    assert result.object == "text_completion" and result.model == "tiny-pangrams" and result.id


def test_streamed_completion_joins_to_the_plain_one(client):
    kwargs = dict(model="tiny-pangrams", prompt="Pack my", max_tokens=40, temperature=0)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    # (How many pieces depends on timing: the first token is sent at once, later ones every
    # --stream-interval, 20 ms, a few at a time.)
    assert "".join(pieces) == plain.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(plain.text) + 1  # and eos


def test_eos_ends_a_choice_with_finish_reason_stop(server, net):
    ids, text = reference(net, "Sphinx of black", 50)
    assert ids[-1] == EOS and text == " quartz, judge my vow. "  # the model ends the document
    response = post(server, "/v1/completions", {"prompt": "Sphinx of black", "max_tokens": 50, "temperature": 0})
    choice = response.json()["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "stop"
    assert response.json()["usage"]["completion_tokens"] == len(ids)  # eos counts, as OpenAI's do
    ignored = post(server, "/v1/completions", {"prompt": "Sphinx of black", "max_tokens": 50, "temperature": 0,
                                               "ignore_eos": True}).json()
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 50


def test_chat_with_template_plain_and_streamed(server, client, net):
    messages = [{"role": "system", "content": "How "}, {"role": "user", "content": "vexingly"}]
    result = client.chat.completions.create(model="tiny-pangrams", messages=messages, max_tokens=25, temperature=0)
    ids, text = reference(net, "How vexingly", 25)
    assert result.choices[0].message.content == text and result.choices[0].message.role == "assistant"
    assert result.object == "chat.completion" and result.usage.prompt_tokens == 1 + len("How vexingly")
    stream = client.chat.completions.create(model="tiny-pangrams", messages=messages, max_tokens=25,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(client):
    result = client.chat.completions.create(model="tiny-pangrams", messages=[{"role": "user", "content": "Sphinx"}],
                                            max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert "".join(t.token for t in content) == result.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0


def test_sixteen_concurrent_greedy_clients_match_generate(server, net):
    """16 clients at once, prompts and lengths all different: each gets exactly its `generate` output."""
    candidates = [TEXTS[i % 4][: 3 + i] for i in range(24)] + ["Hello", "zebras jump", "quartz", "my box"]
    chosen = []
    for i, prompt in enumerate(candidates):
        n = 12 + (i * 7) % 40
        ids, text = reference(net, prompt, n)
        if greedy_margin(net, [EOS] + TOKENIZER.encode(prompt), ids) > MIN_MARGIN:
            chosen.append((prompt, n, ids, text))
        if len(chosen) == 16:
            break
    assert len(chosen) == 16, "too few prompts clear the greedy margin"
    assert len({text for *_, text in chosen}) >= 12, "the outputs should differ between prompts"
    before = server.metrics()

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT,
                                      max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.completions.create(model="tiny-pangrams", prompt=prompt,
                                                                     max_tokens=n, temperature=0)
                                          for prompt, n, _, _ in chosen))

    results = asyncio.run(asyncio.wait_for(run_all(), 60))
    for (prompt, n, ids, text), result in zip(chosen, results):
        assert result.choices[0].text == text, prompt
        assert result.usage.completion_tokens == len(ids), prompt
    after = server.metrics()
    batched = after["andromeda_decode_batch_size_count"] - after['andromeda_decode_batch_size_bucket{le="1.0"}']
    assert batched - (before["andromeda_decode_batch_size_count"]
                      - before['andromeda_decode_batch_size_bucket{le="1.0"}']) > 0, "no decode step was batched"


def test_seeded_sampling_is_reproducible_alone_and_batched(server, net):
    body = {"prompt": "Sphinx", "max_tokens": 30, "temperature": 1.5, "top_k": 50, "seed": 1234, "ignore_eos": True}
    first = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert post(server, "/v1/completions", body).json()["choices"][0]["text"] == first
    assert post(server, "/v1/completions", {**body, "seed": 99}).json()["choices"][0]["text"] != first
    # Among other requests (greedy and sampled, other seeds), it still draws the same tokens.
    others = [{"prompt": TEXTS[i % 4][:6], "max_tokens": 40, "temperature": 0.8, "seed": i} for i in range(6)]
    results: list = [None] * 7

    def call(i, b):
        results[i] = post(server, "/v1/completions", b).json()

    threads = [threading.Thread(target=call, args=(i, b)) for i, b in enumerate([*others, body])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results[6]["choices"][0]["text"] == first
    # ... and they are the tokens `andromeda generate --seed 1234` draws.
    ids = [EOS] + TOKENIZER.encode("Sphinx")
    out = generate(net, torch.tensor(ids), 30, temperature=1.5, top_k=50, generator=torch.Generator().manual_seed(1234))
    assert first == TOKENIZER.decode(out[0])
    # Choice i of n draws from seed + i.
    two = post(server, "/v1/completions", {**body, "n": 2}).json()["choices"]
    next_seed = post(server, "/v1/completions", {**body, "seed": 1235}).json()["choices"][0]["text"]
    assert [c["index"] for c in two] == [0, 1] and [c["text"] for c in two] == [first, next_seed]


def test_stop_strings_spanning_tokens_are_never_sent(server, client):
    # Greedy text after "The quick": " brown fox jumps over the lazy dog. " (then eos)
    result = client.completions.create(model="tiny-pangrams", prompt="The quick", max_tokens=60, temperature=0,
                                       stop=["fox j", "never"])
    assert result.choices[0].text == " brown " and result.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny-pangrams", prompt="The quick", max_tokens=60, temperature=0, stop=["fox j"], stream=True)]
    assert "".join(pieces) == " brown " and not any("f" in p for p in pieces)
    # A held-back candidate ("lazy " of "lazy cat") is released once it cannot be a stop string.
    full = client.completions.create(model="tiny-pangrams", prompt="The quick", max_tokens=60, temperature=0)
    held = client.completions.create(model="tiny-pangrams", prompt="The quick", max_tokens=60, temperature=0,
                                     stop=["lazy cat", "dog!"])
    assert held.choices[0].text == full.choices[0].text == " brown fox jumps over the lazy dog. "
    streamed = client.completions.create(model="tiny-pangrams", prompt="The quick", max_tokens=60, temperature=0,
                                         stop=["lazy cat"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    # In chat too.
    chat = client.chat.completions.create(model="tiny-pangrams", messages=[{"role": "user", "content": "Pack my"}],
                                          max_tokens=40, temperature=0, stop="dozen")
    assert chat.choices[0].message.content == " box with five " and chat.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt(server, net):
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    prompt = "The quick brown fox jumps"
    ids = [EOS] + TOKENIZER.encode(prompt)
    with torch.no_grad():
        expected = net(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)  # (N - 1, V)
    for max_tokens in (0, 1):
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1}
        response = post(server, "/v1/completions", body).json()
        choice = response["choices"][0]
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(prompt) and len(logprobs["tokens"]) == len(ids) + max_tokens
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        scored = torch.tensor(logprobs["token_logprobs"][1 : len(ids)])
        torch.testing.assert_close(scored, expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0],
                                   atol=1e-4, rtol=1e-4)
        for top, token_lp in zip(logprobs["top_logprobs"][1:], logprobs["token_logprobs"][1:]):
            assert max(top.values()) >= token_lp  # the argmax is always listed
        assert logprobs["text_offset"][: len(ids)] == [0] + list(range(len(prompt)))
        assert response["usage"] == {"prompt_tokens": len(ids), "completion_tokens": max_tokens,
                                     "total_tokens": len(ids) + max_tokens,
                                     "prompt_tokens_details": {"cached_tokens": 0}}  # scored: read whole
    # Text offsets count characters: a two-byte character spans two tokens at one offset.
    body = {"prompt": "né x", "max_tokens": 0, "logprobs": 0, "echo": True}
    logprobs = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["<|endoftext|>", "n", "bytes:\\xc3", "bytes:\\xa9", " ", "x"]
    assert logprobs["text_offset"] == [0, 0, 1, 1, 2, 3]


def test_prompt_forms_and_choice_indices(server):
    body = {"prompt": ["The quick", "Pack my"], "max_tokens": 5, "temperature": 0, "n": 2}
    response = post(server, "/v1/completions", body).json()
    texts = [(c["index"], c["text"]) for c in response["choices"]]
    assert texts == [(0, " brow"), (1, " brow"), (2, " box "), (3, " box ")]
    ids = [[EOS] + TOKENIZER.encode("The quick"), [EOS] + TOKENIZER.encode("Pack my")]
    by_ids = post(server, "/v1/completions", {**body, "prompt": ids, "n": 1}).json()
    assert [c["text"] for c in by_ids["choices"]] == [" brow", " box "]
    single = post(server, "/v1/completions", {**body, "prompt": ids[0], "n": 1}).json()
    assert single["choices"][0]["text"] == " brow"


def test_long_prompt_is_read_in_chunks_and_max_tokens_clamped(server, net):
    text = "".join(TEXTS) * 7
    ids = ([EOS] + TOKENIZER.encode(text))[:1000]  # four prefill chunks of 256 positions
    body = {"prompt": ids, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    response = post(server, "/v1/completions", body).json()
    choice = response["choices"][0]
    assert response["usage"]["completion_tokens"] == 24 and choice["finish_reason"] == "length"  # 1024 - 1000
    assert choice["text"] == TOKENIZER.decode(generate(net, torch.tensor(ids), 24, temperature=0)[0])


def test_tokenize_detokenize_and_models(server):
    tokens = post(server, "/tokenize", {"prompt": "héllo"}).json()
    assert tokens["tokens"] == [EOS, 104, 195, 169, 108, 108, 111] and tokens["count"] == 7
    assert tokens["max_model_len"] == 1024
    bare = post(server, "/tokenize", {"prompt": "hé", "add_special_tokens": False}).json()
    assert bare["tokens"] == [104, 195, 169]
    assert post(server, "/detokenize", {"tokens": [104, 195, 169]}).json() == {"prompt": "hé"}
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == [EOS, 104, 105]
    models = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()
    assert models["data"][0]["id"] == "tiny-pangrams" and models["data"][0]["max_model_len"] == 1024
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=TIMEOUT).json()
    assert info["eos_token"] == "<|endoftext|>"


# ----------------------------------------------------------------------------- bad input


BAD_REQUESTS = [
    # (body, param, words in the message)
    ({"prompt": "a", "model": "gpt-4"}, "model", ["gpt-4", "does not exist", "tiny-pangrams"]),
    ({"max_tokens": 5}, "prompt", ["missing", "prompt"]),
    ({"prompt": ""}, "prompt", ["empty"]),
    ({"prompt": []}, "prompt", ["string", "token ids"]),
    ({"prompt": [[1, 2], []]}, "prompt", ["empty"]),
    ({"prompt": 5}, "prompt", ["string", "token-id lists"]),
    ({"prompt": [1, "a"]}, "prompt", ["string"]),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens", ["integer"]),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens", ["greater than or equal to 0"]),
    ({"prompt": "a", "temperature": -0.5}, "temperature", ["greater than or equal to 0"]),
    ({"prompt": "a", "temperature": 2.5}, "temperature", ["less than or equal to 2"]),
    ({"prompt": "a", "temperature": "hot"}, "temperature", ["number"]),
    ({"prompt": "a", "top_p": 0}, "top_p", ["greater than 0"]),
    ({"prompt": "a", "top_p": 1.5}, "top_p", ["less than or equal to 1"]),
    ({"prompt": "a", "top_k": -1}, "top_k", ["greater than or equal to 0"]),
    ({"prompt": "a", "min_p": 2}, "min_p", ["less than or equal to 1"]),
    ({"prompt": "a", "n": 0}, "n", ["greater than or equal to 1"]),
    ({"prompt": "a", "stream": "yes"}, "stream", ["boolean"]),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"prompt": "a", "stop": [""]}, "stop", ["non-empty"]),
    ({"prompt": "a", "logprobs": 6}, "logprobs", ["less than or equal to 5"]),
    ({"prompt": "a", "seed": "x"}, "seed", ["integer"]),
    ({"prompt": [5, 258]}, "prompt", ["258", "vocabulary", "[0, 258)"]),
    ({"prompt": [[5], [-1]]}, "prompt", ["-1", "vocabulary"]),
    ({"prompt": "a", "stop_token_ids": [999]}, "stop_token_ids", ["999"]),
    ({"prompt": "a", "frequency_penalty": 2.5}, "frequency_penalty", ["less than or equal to 2"]),
    ({"prompt": "a\ud800"}, "prompt", ["cannot be tokenized"]),
    ({"prompt": "x" * 1100}, "prompt", ["1101 tokens", "1024"]),
    ({"prompt": list(range(200)) * 6, "max_tokens": 0}, "prompt", ["1200 tokens", "1024"]),
]


@pytest.mark.parametrize("body, param, words", BAD_REQUESTS, ids=[b[1] for b in BAD_REQUESTS])
def test_invalid_fields_get_400_naming_them(server, body, param, words):
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"], (word, error["message"])


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_constrained_output_parses_validates_and_matches(server, client):
    """The trained pangram model knows no JSON: its output follows the schema, the regex and the
    choices anyway, because every token the grammar does not allow is masked, row by row."""
    pytest.importorskip("llguidance")
    chat = client.chat.completions.create(
        model="tiny-pangrams", messages=[{"role": "user", "content": "Sphinx"}], max_tokens=200, temperature=0.9,
        seed=3, n=2, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    for choice in chat.choices:
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 8
        assert isinstance(person["age"], int) and 0 <= person["age"] <= 120 and choice.finish_reason == "stop"
    objects = client.completions.create(model="tiny-pangrams", prompt="The", max_tokens=300, temperature=0,
                                        extra_body={"response_format": {"type": "json_object"}})
    text = objects.choices[0].text
    assert objects.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict), text
    assert text.startswith("{")
    pattern = "[a-z]{3,6}-[0-9]{2}"
    regex = client.completions.create(model="tiny-pangrams", prompt=["The", "Sphinx"], max_tokens=20, temperature=1.0,
                                      seed=1, extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, c.text) for c in regex.choices), [c.text for c in regex.choices]
    options = ["quartz", "vexingly", "jump"]
    chosen = client.completions.create(model="tiny-pangrams", prompt="How", max_tokens=20, n=4, temperature=1.0,
                                       seed=2, extra_body={"structured_outputs": {"choice": options}})
    assert all(c.text in options for c in chosen.choices), [c.text for c in chosen.choices]


def test_logit_bias_forces_and_bans_tokens(server, client, net):
    forced = client.completions.create(model="tiny-pangrams", prompt="The", max_tokens=4, temperature=0,
                                       logit_bias={str(ord("Q")): 100})
    assert forced.choices[0].text == "QQQQ"
    _, free = reference(net, "The", 4)
    banned = client.completions.create(model="tiny-pangrams", prompt="The", max_tokens=4, temperature=0,
                                       logit_bias={str(ord(free[0])): -100})
    assert banned.choices[0].text[0] != free[0]


@pytest.mark.parametrize("body, param, words", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", ["regex"]),
    ({"response_format": {"type": "xml"}}, "response_format", ["xml"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", ["nonsense"]),
    ({"logit_bias": {"65": 101}}, "logit_bias", ["[-100, 100]"]),
    ({"logit_bias": {"999999": 1}}, "logit_bias", ["999999"]),
], ids=["bad-regex", "unknown-format", "bad-schema", "bias-range", "bias-id"])
def test_bad_constraints_and_biases_get_400_naming_them(server, body, param, words):
    pytest.importorskip("llguidance")
    response = post(server, "/v1/completions", {"prompt": "The", "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and all(w in error["message"] for w in words), error


def test_malformed_bodies_routes_and_chat_errors(server):
    bad_json = post(server, "/v1/completions", content=b'{"prompt": "a",', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    not_object = post(server, "/v1/completions", [1, 2])
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    empty = post(server, "/v1/completions", content=b"", headers={"content-type": "application/json"})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"
    for body, param in [({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]},
                                                          "messages.0.role"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs")]:
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"].startswith(param), response.text


def test_bad_requests_do_not_disturb_requests_in_flight(server, net):
    _, text = reference(net, "How vexingly", 200)
    results = {}

    def good():
        results["good"] = post(server, "/v1/completions", {"prompt": "How vexingly", "max_tokens": 200,
                                                           "temperature": 0})

    thread = threading.Thread(target=good)
    thread.start()
    for body, *_ in BAD_REQUESTS:
        assert post(server, "/v1/completions", body).status_code == 400
    thread.join(TIMEOUT)
    assert results["good"].json()["choices"][0]["text"] == text


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"prompt": "Sphinx", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines)]
            assert any(line.startswith("data: {") for line in received)
            assert server.metrics()["andromeda_num_requests_running"] == 1
        # Leaving the block closes the connection mid-stream.
    deadline = time.monotonic() + 10
    while server.metrics()["andromeda_num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the disconnected request still holds its slot"
        time.sleep(0.05)
    metrics = server.metrics()
    assert metrics['andromeda_request_success_total{finished_reason="abort"}'] >= 1
    assert metrics["andromeda_generation_tokens_total"] > 0
    later = post(server, "/v1/completions", {"prompt": "The quick", "max_tokens": 5, "temperature": 0})
    assert later.status_code == 200 and later.json()["choices"][0]["text"] == " brow"


def test_metrics_count_exactly_the_requests_sent(server):
    """The counters move by exactly what this test's own requests add: the server is shared with
    other tests, so only the difference is compared. Counters are recorded before a response goes
    out, so they are complete when the last response arrives."""
    sent = {"The quick": 5, "Sphinx of": 7}
    before = server.metrics()
    usages = []
    for prompt, n in sent.items():
        response = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                    "ignore_eos": True})
        assert response.status_code == 200, response.text
        usages.append(response.json()["usage"])
    after = server.metrics()

    def change(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    # Each prompt is read after the eos that opens a document.
    assert [u["prompt_tokens"] for u in usages] == [1 + len(TOKENIZER.encode(p)) for p in sent]
    assert [u["completion_tokens"] for u in usages] == list(sent.values())
    assert change("andromeda_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert change("andromeda_generation_tokens_total") == sum(sent.values())
    for name in ("andromeda_time_to_first_token_seconds_count", "andromeda_e2e_request_latency_seconds_count",
                 "andromeda_request_queue_time_seconds_count"):
        assert change(name) == len(sent), name
    assert change("andromeda_inter_token_latency_seconds_count") == sum(sent.values()) - len(sent)
    assert change('andromeda_request_success_total{finished_reason="length"}') == len(sent)


# ----------------------------------------------------------------------------- auth, overload, shutdown


def test_api_key_is_required_on_api_routes(small_server):
    url = f"{small_server.url}/v1/completions"
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 3, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        response = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(url, json=body, headers={"Authorization": "Bearer sekret"}, timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json()["model"] == "tiny"
    assert httpx.get(f"{small_server.url}/health", timeout=TIMEOUT).status_code == 200  # no key needed
    no_template = httpx.post(f"{small_server.url}/v1/chat/completions", headers={"Authorization": "Bearer sekret"},
                             json={"messages": [{"role": "user", "content": "hi"}]}, timeout=TIMEOUT)
    assert no_template.status_code == 400 and "no chat template" in no_template.json()["error"]["message"]


def test_beyond_slots_and_queue_requests_get_503_with_retry_after(small_server):
    headers = {"Authorization": "Bearer sekret"}
    body = {"prompt": "Sphinx", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT, headers=headers) as http:
        with http.stream("POST", f"{small_server.url}/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: dropping it would close the connection
            next(lines)  # the request holds the one slot
            with http.stream("POST", f"{small_server.url}/v1/completions", json=body) as queued:
                assert queued.status_code == 200  # waits in the queue of one
                refused = http.post(f"{small_server.url}/v1/completions", json={**body, "stream": False})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "overloaded"
    deadline = time.monotonic() + 10
    while small_server.metrics()["andromeda_num_requests_running"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok = httpx.post(f"{small_server.url}/v1/completions", headers=headers, timeout=TIMEOUT,
                    json={"prompt": "Pack my", "max_tokens": 4, "temperature": 0})
    assert ok.json()["choices"][0]["text"] == " box"


def test_sigterm_ends_streams_and_exits_0(small_server):
    body = {"prompt": "Sphinx", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.Client(timeout=TIMEOUT, headers={"Authorization": "Bearer sekret"}) as http:
        with http.stream("POST", f"{small_server.url}/v1/completions", json=body) as response:
            iterator = response.iter_lines()
            lines.append(next(iterator))
            small_server.process.send_signal(signal.SIGTERM)
            lines += list(iterator)  # the stream ends: an error event, then [DONE]
    assert small_server.process.wait(15) == 0, small_server.output()
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and "shutting down" in data[-2]
    with socket.socket() as sock:  # the port is released: nothing listens on it
        # (SO_REUSEADDR: the connection the server closed may still be in TIME_WAIT, which an
        # ordinary bind counts as the port in use; a listening socket still makes bind fail.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", small_server.port))


def test_lm_eval_local_completions_scores_through_the_server(server, net):
    """lm-evaluation-harness's local-completions model finds /tokenizer_info and /tokenize (its
    remote tokenizer) and scores continuations with echo + logprobs: the log-likelihoods the
    model gives directly."""
    pytest.importorskip("tenacity")  # lm-eval[api]
    local_completions = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    lm = local_completions.LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="tiny-pangrams",
                                               max_length=1024, num_concurrent=1, max_retries=1)
    assert lm.tokenizer_backend == "remote"
    pairs = [("The quick brown", " fox"), ("Pack my", " box with")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ids = TOKENIZER.encode(context + continuation)
        with torch.no_grad():
            expected = net(torch.tensor([ids]))[0].log_softmax(-1)
        start = len(TOKENIZER.encode(context))
        assert logprob == pytest.approx(sum(float(expected[i - 1, ids[i]]) for i in range(start, len(ids))), abs=1e-3)
        assert greedy == all(int(expected[i - 1].argmax()) == ids[i] for i in range(start, len(ids)))

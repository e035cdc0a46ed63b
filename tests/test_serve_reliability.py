"""The server under abuse: a vanishing temperature, a row whose sampling fails, penalties per row
(and out of range), a step that fails
with a scoring request in it, bodies and prompts too big, a stream nobody reads, template kwargs
that collide with the server's own arguments, an empty API key, and connections that never send
a whole request head. Each one ends the one request (or connection) at fault with a clear answer,
and everything else keeps going.

Engine and scheduler cases run in-process; HTTP cases against a real `andromeda serve` process
(`Server` from test_serve.py) on a random tiny model, whose greedy text is compared with
`generate` rather than read.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from andromeda import cli  # noqa: E402
from andromeda.checkpoint import load_config, save_pretrained  # noqa: E402
from andromeda.inference.generate import generate  # noqa: E402
from andromeda.inference.sampling import SAMPLING_EPS, SamplingParams, filter_logits, sample  # noqa: E402
from andromeda.serve import runner as runner_module  # noqa: E402
from andromeda.serve.config import ServeConfig  # noqa: E402
from andromeda.serve.core import EngineCore  # noqa: E402
from andromeda.serve.engine import Engine, EngineError, ModelSpec, SequenceRequest  # noqa: E402
from andromeda.serve.scheduler import Sequence  # noqa: E402
from andromeda.serve.server import MAX_HEAD_BYTES  # noqa: E402
from andromeda.tokenizers import ByteTokenizer  # noqa: E402
from helpers import free_port, random_net, run_andromeda  # noqa: E402
from test_serve import Server  # noqa: E402

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id
TIMEOUT = 30.0
BODY_LIMIT = 300_000  # the HTTP server's --max-body-bytes
BACKLOG = 16  # its --max-stream-backlog
HEAD_TIMEOUT = 1.0  # its --header-timeout
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability") / "tiny"
    save_pretrained(random_net(), folder, tokenizer=TOKENIZER)
    (folder.parent / "chat.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def net():
    """The checkpoint's model (the engine tests save the same weights)."""
    return random_net().eval()


@pytest.fixture(scope="module")
def server(checkpoint):
    process = Server(checkpoint, "--chat-template", str(checkpoint.parent / "chat.jinja"), "--window", "256",
                     "--max-body-bytes", str(BODY_LIMIT), "--max-stream-backlog", str(BACKLOG),
                     "--header-timeout", str(HEAD_TIMEOUT))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def greedy_text(net, prompt: str, n: int) -> str:
    ids = [EOS] + TOKENIZER.encode(prompt)
    return TOKENIZER.decode(generate(net, torch.tensor(ids), n, temperature=0)[0])


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=TIMEOUT, **kwargs)


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ----------------------------------------------------------------------------- 5: temperature, sampling failures


def test_a_temperature_below_sampling_eps_is_greedy(net):
    """vLLM's rule: temperature < 1e-5 is greedy. 1e-300 used to overflow fp32 logits to inf,
    softmax to NaN and multinomial to an error."""
    logits = torch.tensor([[3.0, -2.0, 5.0, 5.0 - 1e-3]])
    for temperature in (1e-300, SAMPLING_EPS / 2):
        params = SamplingParams(temperature, top_k=2)
        assert params.greedy and int(sample(logits, params, torch.Generator().manual_seed(0))) == 2
        kept = filter_logits(logits, params)
        assert kept[0, 2] == 5.0 and torch.isinf(kept[0, [0, 1, 3]]).all()
    assert not SamplingParams(SAMPLING_EPS).greedy
    prompt = torch.tensor(list(range(20, 30)))
    expected = generate(net, prompt, 12, temperature=0)
    assert torch.equal(generate(net, prompt, 12, temperature=1e-300, generator=torch.Generator().manual_seed(1)),
                       expected)
    seq = Sequence(prompt.tolist(), 12, SamplingParams(1e-300), 1)
    scheduler = EngineCore(net, ServeConfig(max_batch_size=2))
    scheduler.add(seq)
    scheduler.add(Sequence([5, 6, 7], 12, SamplingParams(1.0), 2))
    while scheduler.has_work:
        scheduler.step()
    assert seq.output == expected[0].tolist() and seq.finish_reason == "length"


def test_generate_cli_with_a_vanishing_temperature_decodes_greedily(checkpoint, net):
    tiny = run_andromeda("generate", "--checkpoint", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "8",
                         "--temperature", "1e-300", "--device", "cpu", timeout=120)
    assert tiny.returncode == 0, tiny.stderr
    assert tiny.stdout == "Hi" + greedy_text(net, "Hi", 8) + "\n"


BAD = SamplingParams(0.9, top_k=13)  # the sampling parameters of the row that fails


def fail_bad_rows(monkeypatch) -> None:
    """Sampling raises for rows with BAD's parameters, as multinomial does on NaN probabilities."""

    def sample_or_fail(logits, params, generator=None):
        if params == BAD:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return sample(logits, params, generator)

    monkeypatch.setattr(runner_module, "sample", sample_or_fail)


def test_a_row_whose_sampling_fails_ends_alone_and_the_batch_goes_on(net, monkeypatch):
    fail_bad_rows(monkeypatch)
    prompts = [list(range(10, 20)), list(range(30, 35)), list(range(40, 52))]
    seqs = [Sequence(prompts[0], 15, SamplingParams(0.8), 7),
            Sequence(prompts[1], 15, BAD, 3),
            Sequence(prompts[2], 15, SamplingParams(0))]
    scheduler = EngineCore(net, ServeConfig(max_batch_size=3))
    for seq in seqs:
        scheduler.add(seq)
    errors = []
    for _ in range(40):
        if not scheduler.has_work:
            break
        errors += [(out.seq, out.error) for out in scheduler.step() if out.error is not None]
    assert errors == [(seqs[1], "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0")]
    assert seqs[1].finish_reason == "error" and seqs[1].output == []
    assert seqs[0].output == generate(net, torch.tensor(prompts[0]), 15, temperature=0.8,
                                      generator=torch.Generator().manual_seed(7))[0].tolist()
    assert seqs[2].output == generate(net, torch.tensor(prompts[2]), 15, temperature=0)[0].tolist()
    assert [s.finish_reason for s in (seqs[0], seqs[2])] == ["length", "length"]
    assert sorted(scheduler.free) == [0, 1, 2]


# ----------------------------------------------------------------------------- penalties


def test_penalties_apply_per_row_in_a_batch(net):
    """Each row is penalized by its own parameters and tokens: in one batch, every row gets what
    `generate` gives it alone (rows 0 and 1 share a prompt and differ only by the penalty)."""
    prompt, other = list(range(10, 20)), [7, 7, 8, 7, 9]
    rows = [(prompt, dict(temperature=0, frequency_penalty=0.8), None),
            (prompt, dict(temperature=0), None),
            (other, dict(temperature=0.9, presence_penalty=0.5, repetition_penalty=1.3), 5),
            (other, dict(temperature=0, repetition_penalty=1.5, frequency_penalty=-0.2), None)]
    seqs = [Sequence(p, 20, SamplingParams(**params), seed)
            for p, params, seed in rows]
    scheduler = EngineCore(net, ServeConfig(max_batch_size=4))
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(40):
        if not scheduler.has_work:
            break
        scheduler.step()
    for seq, (p, params, seed) in zip(seqs, rows):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        assert seq.output == generate(net, torch.tensor(p), 20, generator=generator, **params)[0].tolist(), params
    assert seqs[0].output != seqs[1].output, "the frequency penalty changed nothing"


@pytest.mark.parametrize("penalties", [{"frequency_penalty": 1.0},
                                       {"presence_penalty": 0.7, "repetition_penalty": 1.4}])
def test_a_penalized_request_gives_the_generate_commands_text(server, checkpoint, capsys, penalties):
    prompt = "Hello there"
    texts = []
    for extra in (penalties, {}):
        response = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0, **extra})
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    text, plain = texts
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in penalties.items()]
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "24",
                     "--temperature", "0", "--device", "cpu", *flags]) == 0
    assert capsys.readouterr().out == prompt + text + "\n"
    assert text != plain, "the penalties changed nothing"


@pytest.mark.parametrize("field, value, words", [
    ("frequency_penalty", 2.5, "less than or equal to 2"),
    ("frequency_penalty", -2.01, "greater than or equal to -2"),
    ("presence_penalty", 3, "less than or equal to 2"),
    ("repetition_penalty", 0, "greater than 0"),
    ("repetition_penalty", -1.0, "greater than 0"),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_range_penalties_get_400_naming_them(server, route, field, value, words):
    body = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    response = post(server, route, {**body, "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"], error


# ----------------------------------------------------------------------------- the engine thread


@pytest.fixture
def engine_checkpoint(tmp_path):
    save_pretrained(random_net(), tmp_path / "ckpt", tokenizer=TOKENIZER)
    return tmp_path / "ckpt"


def run_engine(checkpoint, scenario, **options):
    """Run `scenario(engine)` (a coroutine) on a started engine; stop the engine afterwards."""
    engine = Engine(ModelSpec(checkpoint), TOKENIZER, ServeConfig(**options))
    engine.start()
    try:
        assert engine.ready.wait(30)
        return asyncio.run(asyncio.wait_for(scenario(engine), 60))
    finally:
        engine.shutdown()
        engine.join(10)


async def read_to_end(stream) -> list:
    deltas = []
    while not any(d.finish_reason for d in deltas):
        deltas += await asyncio.wait_for(stream.get(), 10)
    return deltas


def test_the_engine_fails_the_request_of_a_failed_row_only(engine_checkpoint, monkeypatch):
    fail_bad_rows(monkeypatch)

    async def scenario(engine):
        loop = asyncio.get_running_loop()
        good = engine.submit([SequenceRequest(0, [EOS, 65], 30, SamplingParams(0.9), seed=1)], loop)
        greedy = engine.submit([SequenceRequest(0, [EOS, 66], 30, SamplingParams(0))], loop)
        doomed = engine.submit([SequenceRequest(0, [EOS, 67], 30, BAD, seed=2),
                                SequenceRequest(1, [EOS, 67], 30, SamplingParams(0.9), seed=3)], loop)
        with pytest.raises(EngineError, match="sampling failed: RuntimeError: probability tensor"):
            await read_to_end(doomed)
        return await read_to_end(good), await read_to_end(greedy), engine

    good, greedy, engine = run_engine(engine_checkpoint, scenario, max_batch_size=4)
    for deltas in (good, greedy):
        assert sum(len(d.token_ids) for d in deltas) == 30 and deltas[-1].finish_reason == "length"
    assert sorted(engine.core.free) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- 6: every admitted request answered


def test_a_scoring_request_admitted_in_a_failing_step_still_gets_its_answer(engine_checkpoint):
    """A max_tokens=0 request ends as it is admitted; the same step's decode call then fails (as
    out of memory would). The scoring request still gets its answer, the decoding one an error,
    and the engine serves the next request."""

    async def scenario(engine):
        loop = asyncio.get_running_loop()
        core, runner = engine.core, engine.core.runner
        running = engine.submit([SequenceRequest(0, [EOS, 65], 900, SamplingParams(0))], loop)
        await asyncio.wait_for(running.get(), 10)  # it is decoding now
        forward = runner._forward

        def failing_forward(batch):
            if any(s.max_tokens == 0 for s in core.admitted):
                raise RuntimeError("CUDA out of memory (injected)")
            return forward(batch)

        runner._forward = failing_forward
        scoring = engine.submit([SequenceRequest(0, [EOS, 70, 71, 72], 0, SamplingParams(0), prompt_logprobs=1)],
                                loop)
        answer = await read_to_end(scoring)
        with pytest.raises(EngineError, match="generation failed: CUDA out of memory"):
            await read_to_end(running)
        runner._forward = forward
        after = await read_to_end(engine.submit([SequenceRequest(0, [EOS, 66], 3, SamplingParams(0))], loop))
        return answer, after

    answer, after = run_engine(engine_checkpoint, scenario, max_batch_size=2)
    assert answer[-1].finish_reason == "length" and len(answer[-1].prompt_logprobs) == 4
    assert sum(len(d.token_ids) for d in after) == 3


# ----------------------------------------------------------------------------- 8: backpressure


def test_a_stream_nobody_reads_pauses_at_the_backlog_and_resumes_when_read(engine_checkpoint, net):
    prompt = [EOS, 65, 66]

    async def scenario(engine):
        loop = asyncio.get_running_loop()
        scheduler = engine.core
        unread = engine.submit([SequenceRequest(0, prompt, 40, SamplingParams(0))], loop)
        await asyncio.to_thread(wait_for, lambda: scheduler.paused == 1, "the unread stream never paused")
        seq = scheduler.running[0]
        await asyncio.sleep(0.3)
        assert len(seq.output) == 8 and seq.paused  # the backlog, and not one token more
        # The paused stream holds its slot, not the engine: another request runs to its end.
        other = await read_to_end(engine.submit([SequenceRequest(0, [EOS, 70], 5, SamplingParams(0))], loop))
        assert sum(len(d.token_ids) for d in other) == 5
        resumed = await read_to_end(unread)  # reading lets it go on, as often as it catches up
        # A stream that is never read and then closed (the client went away) frees its slot.
        abandoned = engine.submit([SequenceRequest(0, prompt, 500, SamplingParams(0))], loop)
        await asyncio.to_thread(wait_for, lambda: scheduler.paused == 1, "the second stream never paused")
        engine.abort(abandoned.request_id)
        await asyncio.to_thread(wait_for, lambda: not scheduler.running, "the aborted stream kept its slot")
        return [t for d in resumed for t in d.token_ids], scheduler

    tokens, scheduler = run_engine(engine_checkpoint, scenario, max_batch_size=2, max_stream_backlog=8, stream_interval=0)
    assert tokens == generate(net, torch.tensor(prompt), 40, temperature=0)[0].tolist()
    assert sorted(scheduler.free) == [0, 1] and scheduler.paused == 0


# ----------------------------------------------------------------------------- 7: body and prompt size


class RecordingTokenizer(ByteTokenizer):
    """Bytes, recording for each text it encodes its length and whether it ran on an event loop."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def encode(self, text: str) -> list[int]:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((len(text), on_loop))
        return super().encode(text)


def in_process_client(checkpoint, tokenizer, **context):
    """The app in-process, its engine never started: enough for what is refused before the engine."""
    from fastapi.testclient import TestClient

    from andromeda.serve.app import ServerContext, create_app
    from andromeda.serve.metrics import Metrics

    engine = Engine(ModelSpec(checkpoint), tokenizer)
    ctx = ServerContext(engine, tokenizer, load_config(checkpoint), "tiny", Metrics("tiny"), **context)
    return ctx, TestClient(create_app(ctx))


def test_long_prompts_are_tokenized_off_the_event_loop_and_refused_unread_when_far_too_long(engine_checkpoint):
    from andromeda.serve.chat_template import ChatTemplate

    tokenizer = RecordingTokenizer()
    ctx, client = in_process_client(engine_checkpoint, tokenizer, chat_template=ChatTemplate(CHAT_TEMPLATE))
    assert ctx.max_body_bytes == 4 << 20  # the default for a context of 1024 tokens
    long = client.post("/v1/completions", json={"prompt": "x" * 50_000})
    assert long.status_code == 400 and "the prompt has 50001 tokens" in long.json()["error"]["message"]
    counted = client.post("/tokenize", json={"prompt": "y" * 50_000})
    assert counted.status_code == 200 and counted.json()["count"] == 50_001
    assert tokenizer.calls == [(50_000, False), (50_000, False)]  # on a worker thread, not the event loop
    huge = client.post("/v1/completions", json={"prompt": "x" * 200_000})
    error = huge.json()["error"]
    assert huge.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "200000 characters" in error["message"] and "1024 tokens" in error["message"]
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 200_000}]})
    error = chat.json()["error"]
    assert chat.status_code == 400 and error["param"] == "messages" and "200000 characters" in error["message"]
    assert len(tokenizer.calls) == 2, "a prompt far over the context was tokenized"
    short = client.post("/tokenize", json={"prompt": "hi"})
    assert short.json()["count"] == 3 and tokenizer.calls[-1] == (2, True)  # short ones inline


def test_the_default_body_limit_follows_the_context(engine_checkpoint):
    from andromeda.serve.prompts import default_max_body_bytes

    assert default_max_body_bytes(1024) == 4 << 20 and default_max_body_bytes(65_536) == 256 * 65_536
    _, client = in_process_client(engine_checkpoint, TOKENIZER)
    response = client.post("/v1/completions", content=b" " * ((4 << 20) + 1),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_body_over_the_limit_gets_413_and_the_server_keeps_serving(server):
    with httpx.Client(timeout=TIMEOUT) as http:
        big = http.post(f"{server.url}/v1/completions", json={"prompt": "x" * BODY_LIMIT})
        error = big.json()["error"]
        assert big.status_code == 413 and error["code"] == "request_too_large"
        assert f"{BODY_LIMIT} bytes" in error["message"] and "--max-body-bytes" in error["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b" " * 10_000

        chunked = http.post(f"{server.url}/v1/completions", content=chunks(),
                            headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        ok = http.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200


# ----------------------------------------------------------------------------- 5 and 8 over HTTP


def test_a_vanishing_temperature_is_greedy_and_disturbs_no_other_stream(server, net):
    results = {}

    def stream():
        body = {"prompt": "Hello", "max_tokens": 150, "temperature": 0.9, "seed": 3, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
            results["events"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    thread = threading.Thread(target=stream)
    thread.start()
    tiny = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 20, "temperature": 1e-300,
                                            "ignore_eos": True})
    thread.join(TIMEOUT)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy_text(net, "Hi", 20)
    events = results["events"]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_a_stream_nobody_reads_pauses_and_closing_it_frees_its_slot(server):
    """The client reads nothing: once the kernel's socket buffers are full (a few MB; the widest
    events, 8 choices with 20 alternatives a token, fill them in seconds) the server's writes
    stall, the handler stops taking tokens, and the sequences pause."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100_000, "temperature": 0,
                       "ignore_eos": True, "stream": True, "n": 8, "logprobs": True, "top_logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(TIMEOUT)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        # (It may pause and resume before, whenever the event loop lags behind the engine.)
        wait_for(lambda: stalled(server), "the unread stream never paused for good", timeout=60)
        generated = server.metrics()["andromeda_generation_tokens_total"]
        time.sleep(2 * HEAD_TIMEOUT)  # neither does it grow, nor does the head timeout close a running request
        metrics = server.metrics()
        assert metrics["andromeda_generation_tokens_total"] == generated and generated < 100_000
        assert metrics["andromeda_num_requests_running"] == 8
        assert sock.recv(4096)  # the connection is open and streaming
    finally:
        sock.close()
    wait_for(lambda: server.metrics()["andromeda_num_requests_running"] == 0, "the closed stream kept its slot")
    assert server.metrics()["andromeda_num_requests_paused"] == 0


def stalled(server) -> bool:
    """All 8 choices are paused and no token came in the last half second."""
    before = server.metrics()["andromeda_generation_tokens_total"]
    time.sleep(0.5)
    metrics = server.metrics()
    return metrics["andromeda_num_requests_paused"] == 8 and metrics["andromeda_generation_tokens_total"] == before


# ----------------------------------------------------------------------------- 9: chat_template_kwargs


def test_chat_template_kwargs_may_not_set_the_servers_own_arguments(server):
    with httpx.Client(timeout=TIMEOUT) as http:  # one keep-alive connection throughout
        for key, value in (("messages", [{"role": "user", "content": "x"}]), ("add_generation_prompt", False)):
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                    "chat_template_kwargs": {key: value, "other": 1}}
            response = http.post(f"{server.url}/v1/chat/completions", json=body)
            error = response.json()["error"]
            assert response.status_code == 400 and error["param"] == "chat_template_kwargs"
            assert f"'{key}'" in error["message"] and error["type"] == "invalid_request_error"
        fine = http.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "chat_template_kwargs": {"other": 1}})
        assert fine.status_code == 200


# ----------------------------------------------------------------------------- 10: an empty API key


def test_an_empty_api_key_is_refused_at_start(checkpoint, monkeypatch, capsys):
    """An empty key used to switch authentication off without a word."""
    try:  # the environment variable, through the real command
        result = run_andromeda("serve", "--checkpoint", str(checkpoint), "--port", str(free_port()), timeout=20,
                               ANDROMEDA_API_KEY="")
    except subprocess.TimeoutExpired:
        pytest.fail("the server started with an empty ANDROMEDA_API_KEY")
    assert result.returncode == 2 and "--api-key" in result.stderr and "empty" in result.stderr, result.stderr
    # The flag, empty or blank, in-process (a server that starts anyway fails the test at once).
    from andromeda.cli import main
    from andromeda.serve import server

    def started(*args, **kwargs):
        raise AssertionError("the server started with an empty --api-key")

    real_serve = server.serve
    monkeypatch.setattr(server, "serve", started)
    monkeypatch.delenv("ANDROMEDA_API_KEY", raising=False)
    for key in ("", "  "):
        assert main(["serve", "--checkpoint", str(checkpoint), "--api-key", key]) == 2
        assert "argument --api-key: the key is empty" in capsys.readouterr().err
    # And `serve` itself, before anything else (here a bad port, which the old code reported instead).
    with pytest.raises(ValueError, match="--api-key is empty"):
        real_serve(checkpoint, ServeConfig(api_key="", port=-1))


# ----------------------------------------------------------------------------- 11: half-open connections


def closed_within(sock: socket.socket, limit: float, started: float | None = None) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took since
    `started` (a time.monotonic() taken before the bytes the server times were sent; now if None)."""
    started = time.monotonic() if started is None else started
    sock.settimeout(limit)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received, time.monotonic() - started


def test_a_connection_that_never_sends_a_whole_head_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as partial, \
            socket.create_connection(("127.0.0.1", server.port)) as silent:
        sent = time.monotonic()  # before the bytes: the server's deadline cannot start earlier
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        received, waited = closed_within(partial, 5 * HEAD_TIMEOUT, sent)
        assert received.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in received
        assert HEAD_TIMEOUT * 0.8 < waited < 5 * HEAD_TIMEOUT
        assert closed_within(silent, 5 * HEAD_TIMEOUT)[0] == b""
    with socket.create_connection(("127.0.0.1", server.port)) as flood:  # a head that never ends
        # Just over the cap, so the server has read it all when it closes (else the close resets).
        head = b"GET /health HTTP/1.1\r\nX-Pad: "
        flood.sendall(head + b"a" * (MAX_HEAD_BYTES + 100 - len(head)))
        assert closed_within(flood, 5 * HEAD_TIMEOUT)[0].startswith(b"HTTP/1.1 431")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200

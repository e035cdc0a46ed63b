"""lm-evaluation-harness adapter: each request type against a direct computation, rolling
loglikelihood against `andromeda eval`, and whole local tasks against the harness's own HFLM on
the exported Hugging Face folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from andromeda.inference.generate import generate  # noqa: E402
from andromeda import Andromeda  # noqa: E402
from andromeda.data import TokenStore  # noqa: E402
from andromeda.evaluation import evaluate  # noqa: E402
from andromeda.interop.lm_eval import AndromedaLM, format_table, run_lm_eval  # noqa: E402
from andromeda.tokenizers import ByteTokenizer  # noqa: E402

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
ROOT = TASKS_DIR.parents[1]  # the tasks' data_files are relative to the repository root
TASKS = ["andromeda_gen", "andromeda_mc", "andromeda_ppl"]
MAX_LEN = 128


def _corpus() -> str:
    """What the tasks ask, as text: the facts of the generation task and the perplexity texts."""
    data = TASKS_DIR / "data"
    facts = [json.loads(line) for line in (data / "gen.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in (data / "ppl.jsonl").read_text().splitlines()]
    return "".join(f"Q: {f['question']}\nA: {f['answer']}\n" for f in facts) + "\n".join(texts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte model trained 70 steps on the tasks' text: right on some items, wrong on others,
    so the scores compared below are not all 0 or 1. Saved as a checkpoint; returns its folder."""
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    data = torch.tensor(tokenizer.encode(_corpus()))
    model = Andromeda.from_config("tiny", max_seq_len=MAX_LEN)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(70):
        starts = torch.randint(0, len(data) - 65, (16,))
        loss = model(torch.stack([data[s : s + 65] for s in starts]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("lm_eval") / "checkpoint"
    model.eval().save_pretrained(folder, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def lm(trained):
    return AndromedaLM(checkpoint=str(trained), batch_size=4, device="cpu")


def requests(kind: str, *arguments) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def direct_score(lm: AndromedaLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) and its greediness from one unpadded forward pass."""
    tokens = torch.tensor(context + continuation)[None]
    with torch.no_grad():
        logprobs = F.log_softmax(lm.net(tokens[:, :-1]).float(), dim=-1)[0, -len(continuation):]
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


# ----------------------------------------------------------------------------- construction


def test_registered_and_built_from_an_arg_string(trained, tmp_path):
    assert get_model("andromeda") is AndromedaLM
    lm = get_model("andromeda").create_from_arg_string(
        f"checkpoint={trained},max_length=64", {"batch_size": 3, "device": "cpu", "max_batch_size": None}
    )
    assert (lm.batch_size, lm.max_length, lm.device.type, lm.eot_token_id) == (3, 64, "cpu", 256)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        AndromedaLM(checkpoint=str(trained), batch_size="auto")
    with pytest.raises(ValueError, match=f"max_length must be in 1..{MAX_LEN}"):
        AndromedaLM(checkpoint=str(trained), max_length=MAX_LEN + 1)
    with pytest.raises(TypeError, match="pretrained"):
        AndromedaLM(checkpoint=str(trained), pretrained="gpt2")


def test_an_exported_hugging_face_folder_loads_too(trained, lm, tmp_path):
    from andromeda.interop.hf import export_hf

    folder = export_hf(Andromeda.from_pretrained(trained), ByteTokenizer(), tmp_path / "hf")
    other = AndromedaLM(checkpoint=str(folder), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(other.net.state_dict().values(), lm.net.state_dict().values()))
    assert isinstance(other.tokenizer, ByteTokenizer)


# ----------------------------------------------------------------------------- request types


def test_loglikelihood_equals_one_unpadded_pass_per_request(lm, trained):
    pairs = [("Q: What colour is the sky?\nA:", " blue"), ("Q: What colour is grass?\nA:", " red"),
             ("", "The sky is blue."), ("Grüße aus", " Köln"), ("x" * 300, " y")]  # the last is truncated
    scores = lm.loglikelihood(requests("loglikelihood", *pairs))
    one_by_one = AndromedaLM(checkpoint=str(trained), batch_size=1).loglikelihood(
        requests("loglikelihood", *pairs))
    for (context, continuation), (score, greedy), (single, _) in zip(pairs, scores, one_by_one):
        ctx = lm.tok_encode(context) or [lm.eot_token_id]
        cont = lm.tok_encode(context + continuation)[len(lm.tok_encode(context)):]
        ctx = (ctx + cont)[-(MAX_LEN + 1):][: -len(cont)]
        expected, expected_greedy = direct_score(lm, ctx, cont)
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert single == pytest.approx(score, rel=1e-5, abs=1e-5)  # padding never changes a score
        assert greedy == expected_greedy
    # is_greedy: the model's own greedy continuation is greedy, a changed one is not.
    context = lm.tok_encode("Q: What colour is snow?\nA:")
    own = generate(lm.net, torch.tensor(context), 4, temperature=0)[0].tolist()
    changed = own[:-1] + [(own[-1] + 1) % 256]
    [(_, own_greedy), (_, changed_greedy)] = lm._loglikelihood_tokens(
        [(None, context, own), (None, context, changed)])
    assert own_greedy and not changed_greedy


@pytest.mark.parametrize("window", [MAX_LEN, 32])
def test_rolling_loglikelihood_equals_minus_andromeda_eval_total(trained, tmp_path, window):
    """Over a text of whole windows, the harness's rolling windows are `andromeda eval`'s: each
    token predicted once, the first after eos; so the sums agree."""
    text = (_corpus().replace("ō", "o") * 3)[: 3 * window]  # ASCII: 3 * window byte tokens
    file = tmp_path / "doc.txt"
    file.write_text(text)
    store = TokenStore([file], ByteTokenizer(), cache_dir=tmp_path / "cache")
    tokens = np.asarray(store.tokens[:-1])  # eos doc; the final eos is not part of the text
    model = Andromeda.from_pretrained(trained)
    metrics = evaluate(model.Andromeda, tokens, seq_len=window, batch_size=2, num_bytes=len(text))
    assert metrics["tokens"] == len(text)
    lm = AndromedaLM(checkpoint=str(trained), batch_size=2, max_length=window)
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert -rolling == pytest.approx(metrics["loss"] * metrics["tokens"], rel=1e-4)


def test_rolling_loglikelihood_predicts_each_token_once(lm):
    """Windows of max_length predictions, the first after eos, the last with a full context."""
    text = "Grüße aus Köln! " * 20  # 360 bytes: two full windows and a partial one
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    ids = lm.tok_encode(text)
    seq = [lm.eot_token_id] + ids  # seq[k + 1] is ids[k]
    expected, start = 0.0, 0
    while start < len(ids):  # predict ids[start:end] from up to MAX_LEN tokens before `end`
        end = min(start + MAX_LEN, len(ids))
        expected += direct_score(lm, seq[max(0, end - MAX_LEN) : start + 1], seq[start + 1 : end + 1])[0]
        start = end
    assert rolling == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_at_the_first_stop_string(lm, trained):
    gen = {"until": ["\n", "Q:"], "max_gen_toks": 24, "do_sample": False}
    prompts = ["Q: What colour is the sky?\nA:", "Q: Which city is in Japan?\nA:", "The sky", "Grüße"]
    texts = lm.generate_until(requests("generate_until", *[(p, gen) for p in prompts]))
    one_by_one = AndromedaLM(checkpoint=str(trained), batch_size=1).generate_until(
        requests("generate_until", *[(p, gen) for p in prompts]))
    assert texts == one_by_one
    cut = 0
    for prompt, text in zip(prompts, texts):
        full = greedy_text(lm, prompt, 24)
        cuts = [full.find(stop) for stop in gen["until"] if stop in full]
        assert text == (full[: min(cuts)] if cuts else full)
        cut += bool(cuts)
    assert cut, "no greedy continuation reaches a stop string: the cut is not tested"
    assert any(text.strip() for text in texts)
    # No stop string: the whole greedy continuation of max_gen_toks new tokens, unless eos comes first.
    [free] = lm.generate_until(requests("generate_until", ("Q: What", {"until": [], "max_gen_toks": 5})))
    assert free == greedy_text(lm, "Q: What", 5) and len(free.encode()) == 5


def greedy_text(lm: AndromedaLM, prompt: str, new_tokens: int) -> str:
    """The text of our greedy `generate` after `prompt`, up to eos."""
    ids = generate(lm.net, torch.tensor(lm.tok_encode(prompt)), new_tokens, temperature=0,
                   eos_token=lm.eot_token_id)[0].tolist()
    return lm.tok_decode(ids[: ids.index(lm.eot_token_id)] if lm.eot_token_id in ids else ids)


# ----------------------------------------------------------------------------- whole tasks


def test_run_lm_eval_on_the_local_tasks(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    output = tmp_path / "results.json"
    results = run_lm_eval(trained, ",".join(TASKS), include_path=TASKS_DIR, batch_size=4, output=output,
                          device="cpu", include_defaults=False, bootstrap_iters=0)
    assert sorted(results["results"]) == TASKS
    assert 0 < results["results"]["andromeda_mc"]["acc,none"] < 1  # a model with something to learn
    assert results["results"]["andromeda_ppl"]["bits_per_byte,none"] < 8  # better than uniform bytes
    assert json.loads(output.read_text())["results"].keys() == results["results"].keys()
    table = format_table(results)
    assert all(task in table for task in TASKS) and "bits_per_byte" in table
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['no_such_task'\]"):
        run_lm_eval(trained, "andromeda_mc,no_such_task", include_path=TASKS_DIR, include_defaults=False)


def _close(ours, theirs, path="") -> None:
    """Nested responses equal: floats to 1e-4, everything else exactly."""
    if isinstance(ours, float) or isinstance(theirs, float):
        assert math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-4), (path, ours, theirs)
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _close(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, (path, ours, theirs)


def test_hflm_on_the_export_scores_like_andromeda_lm(trained, tmp_path, monkeypatch):
    """The harness's own HFLM, running the exported folder through transformers, gives the same
    per-request answers and metrics as AndromedaLM on the checkpoint."""
    pytest.importorskip("transformers")
    huggingface = pytest.importorskip("lm_eval.models.huggingface")  # needs accelerate
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from andromeda.interop.hf import export_hf

    monkeypatch.chdir(ROOT)
    folder = export_hf(Andromeda.from_pretrained(trained), ByteTokenizer(), tmp_path / "hf")
    runs = {}
    # The export's tokenizer opens a document with eos (as `andromeda generate` does); AndromedaLM
    # feeds a context as it is, so HFLM is asked not to add special tokens either.
    for name, model in [("ours", AndromedaLM(checkpoint=str(trained), batch_size=3, device="cpu")),
                        ("hf", huggingface.HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=3,
                                                device="cpu", dtype="float32", add_bos_token=False))]:
        runs[name] = simple_evaluate(model=model, tasks=TASKS, bootstrap_iters=0, log_samples=True,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    ours, theirs = runs["ours"], runs["hf"]
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                assert math.isclose(value, theirs["results"][task][metric], rel_tol=1e-4), (task, metric)
        by_doc = {s["doc_id"]: s for s in theirs["samples"][task]}
        for sample in ours["samples"][task]:
            theirs_sample = by_doc[sample["doc_id"]]
            _close(sample["filtered_resps"], theirs_sample["filtered_resps"], f"{task}/{sample['doc_id']}")


# ----------------------------------------------------------------------------- extras


def test_missing_harness_names_the_extra():
    code = "import sys; sys.modules['lm_eval'] = None; import andromeda.interop.lm_eval"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "pip install -e '.[eval]' in the andromeda checkout" in out.stderr


def test_the_lm_eval_command_prints_the_harness_table(trained, tmp_path, monkeypatch, capsys):
    from andromeda import cli

    monkeypatch.chdir(ROOT)
    output = tmp_path / "results.json"
    args = ["lm-eval", "--checkpoint", str(trained), "--tasks", "andromeda_mc", "--include-path", str(TASKS_DIR),
            "--limit", "4", "--batch-size", "2", "--device", "cpu", "--output", str(output)]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "andromeda_mc" in table and "acc" in table
    saved = json.loads(output.read_text())
    row = next(line for line in table.splitlines() if "|acc     |" in line)
    assert float(row.split("|")[7]) == pytest.approx(saved["results"]["andromeda_mc"]["acc,none"], abs=1e-4)

"""Opening and loading any model folder (`checkpoint.source`, `checkpoint.loader`): a run folder, a
checkpoint, a quantized checkpoint or a Hugging Face export is resolved and parsed once, and every
command that takes --checkpoint (or --init-from) loads an export exactly as the checkpoint it was
exported from: the same weights, the same greedy text, the same scores."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from andromeda import cli
from andromeda.checkpoint import (
    CHECKPOINT,
    HF_EXPORT,
    QUANTIZED,
    latest_checkpoint,
    load_checkpoint_tokenizer,
    load_for_inference,
    load_transformer,
    open_model_source,
    save_pretrained,
)
from andromeda.checkpoint import inference_dtype
from andromeda.checkpoint import source as source_module
from andromeda.inference.quantize import Int8Linear, quantize
from andromeda.interop.hf import export_hf
from andromeda.tokenizers import ByteTokenizer
from andromeda.train import train
from helpers import random_net, tiny_train_config

TOKENIZER = ByteTokenizer()
PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loading") / "ckpt"
    save_pretrained(random_net(), folder, tokenizer=TOKENIZER)
    return folder


@pytest.fixture(scope="module")
def hf_export(checkpoint, tmp_path_factory):
    return export_hf(load_transformer(checkpoint), TOKENIZER, tmp_path_factory.mktemp("loading") / "hf")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    one, other = a.state_dict(), b.state_dict()
    return one.keys() == other.keys() and all(torch.equal(one[n], other[n]) for n in one)


# ----------------------------------------------------------------------------- the source


def test_each_kind_of_folder_opens_as_itself(checkpoint, hf_export, tmp_path, corpus):
    native, exported = open_model_source(checkpoint), open_model_source(hf_export)
    assert (native.kind, native.folder, native.quantization) == (CHECKPOINT, checkpoint, None)
    assert (exported.kind, exported.folder, exported.quantization) == (HF_EXPORT, hf_export, None)
    assert exported.config == native.config
    quantized = save_pretrained(quantize(load_transformer(checkpoint, dtype=torch.bfloat16), "int8"), tmp_path / "q")
    assert (open_model_source(quantized).kind, open_model_source(quantized).quantization) == (QUANTIZED, ("int8", None))
    result = train(tiny_train_config(tmp_path, corpus, max_steps=2, eval_batches=0))
    run = open_model_source(tmp_path / "run")  # a run folder: its latest checkpoint
    assert run.folder == latest_checkpoint(tmp_path / "run") == result.checkpoint and run.kind == CHECKPOINT


def test_a_folder_is_resolved_and_parsed_once_for_a_whole_load(checkpoint, hf_export, monkeypatch):
    """Opening reads config.json; loading the weights, the tokenizer and the inference model from
    the source reads it no more."""
    reads = []
    read = source_module.read_config_json
    monkeypatch.setattr(source_module, "read_config_json", lambda file: reads.append(file) or read(file))
    for folder in (checkpoint, hf_export):
        reads.clear()
        source = open_model_source(folder)
        load_transformer(source)
        load_for_inference(source, device="cpu", quantize="int8")
        load_checkpoint_tokenizer(source)
        assert reads == [folder / "config.json"]


def test_another_architecture_is_named_not_parsed_as_ours(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*not an Andromeda model; expected model_type 'andromeda'"):
        open_model_source(tmp_path / "gpt2")


def test_the_inference_dtype_policy(checkpoint, tmp_path):
    """--dtype when given; a quantized checkpoint as saved; bf16 to quantize or to decode on CUDA."""
    source = open_model_source(checkpoint)
    assert inference_dtype(source, None, "cpu") is None
    assert inference_dtype(source, "bf16", "cpu") is torch.bfloat16
    assert inference_dtype(source, torch.float32, "cuda") is torch.float32
    assert inference_dtype(source, None, "cpu", quantize="int4") is torch.bfloat16
    assert inference_dtype(source, None, "cuda") is torch.bfloat16
    assert inference_dtype(source, None, "cuda", decoding=False) is None
    quantized = open_model_source(save_pretrained(quantize(load_transformer(checkpoint), "int8"), tmp_path / "q"))
    assert inference_dtype(quantized, None, "cuda", quantize="int8") is None
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'fp32'\], got 'fp16'"):
        inference_dtype(source, "fp16", "cpu")


# ----------------------------------------------------------------------------- an export loads everywhere


def test_the_loader_reads_an_export_as_its_checkpoint(checkpoint, hf_export):
    assert same_weights(load_transformer(hf_export), load_transformer(checkpoint))
    as_bf16 = load_transformer(hf_export, dtype=torch.bfloat16, quantize="int8")
    assert isinstance(as_bf16.to_logits, Int8Linear)
    assert same_weights(as_bf16, load_transformer(checkpoint, dtype=torch.bfloat16, quantize="int8"))
    assert isinstance(load_checkpoint_tokenizer(hf_export), ByteTokenizer)


def test_generate_eval_quantize_and_export_take_an_export(checkpoint, hf_export, tmp_path, corpus, capsys):
    def output(*args: str) -> str:
        assert cli.main(list(args)) == 0
        return capsys.readouterr().out

    greedy = ["generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "0", "--device", "cpu"]
    assert output(*greedy, "--checkpoint", str(hf_export)) == output(*greedy, "--checkpoint", str(checkpoint))
    scores = ["eval", "--data", str(corpus), "--seq-len", "32", "--json", "--device", "cpu", "--cache-dir",
              str(tmp_path / "cache")]
    native = json.loads(output(*scores, "--checkpoint", str(checkpoint)))
    exported = json.loads(output(*scores, "--checkpoint", str(hf_export)))
    assert exported["loss"] == native["loss"] and exported["checkpoint"] == str(hf_export)
    for name, source in (("from-ckpt", checkpoint), ("from-hf", hf_export)):
        output("quantize", "--checkpoint", str(source), "--out", str(tmp_path / name), "--scheme", "int8")
        output("export-hf", "--checkpoint", str(source), "--out", str(tmp_path / f"{name}-hf"))
    assert same_weights(load_transformer(tmp_path / "from-hf"), load_transformer(tmp_path / "from-ckpt"))
    assert ((tmp_path / "from-hf-hf" / "model.safetensors").read_bytes()
            == (tmp_path / "from-ckpt-hf" / "model.safetensors").read_bytes())


def test_serve_answers_from_an_export_as_from_its_checkpoint(checkpoint, hf_export):
    """`andromeda serve --checkpoint HF_EXPORT` (a real server process): the greedy completion
    `generate` gives for the checkpoint, on a prompt whose greedy steps are far from ties."""
    from test_serve import MIN_MARGIN, TIMEOUT, Server, greedy_margin, reference

    net = load_transformer(checkpoint)
    prompt = next(p for p in ("To be", "Once upon", "The quick", "Sphinx of", "Pack my")
                  if greedy_margin(net, [TOKENIZER.eos_id, *TOKENIZER.encode(p)], reference(net, p, 12)[0]) > MIN_MARGIN)
    ids, text = reference(net, prompt, 12)
    server = Server(hf_export)
    try:
        server.wait_ready()
        response = httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT,
                              json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == text
        assert response.json()["usage"]["completion_tokens"] == len(ids)
    finally:
        assert server.stop() == 0, server.output()


def test_init_from_an_export_starts_from_the_same_weights_as_from_its_checkpoint(checkpoint, hf_export, tmp_path,
                                                                                  corpus):
    """`train --init-from HF_EXPORT`: the checkpoint's config, tokenizer and weights, so one step
    (at a learning rate of ~0) ends bit for bit where the same step from the checkpoint ends."""
    runs = {}
    for name, source in (("ckpt", checkpoint), ("hf", hf_export)):
        result = train(tiny_train_config(tmp_path, corpus, out=str(tmp_path / name), preset=None, model_overrides={},
                                          init_from=str(source), max_steps=1, eval_batches=0, lr=1e-12, min_lr=0.0,
                                          warmup_steps=0))
        runs[name] = load_transformer(result.checkpoint)
        assert isinstance(load_checkpoint_tokenizer(result.checkpoint), ByteTokenizer)
    assert same_weights(runs["hf"], runs["ckpt"])
    base = load_transformer(checkpoint)
    assert runs["hf"].config == base.config
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(runs["hf"].state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)

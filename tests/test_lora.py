"""LoRA fine-tuning (`train --lora-rank`): only the adapters train and get optimizer state; a
checkpoint holds the adapter in peft's files and points to its base; --resume is bit for bit; the
adapter applied, merged as it loads (--lora) and merged into a checkpoint (merge-lora) give one
model, and peft over the Hugging Face export gives it too; bad input is refused by name."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

from andromeda.checkpoint import (  # noqa: E402
    ADAPTER_FILES,
    attach_lora,
    latest_checkpoint,
    load_transformer,
    open_model_source,
    save_pretrained,
)
from andromeda.cli import main  # noqa: E402
from andromeda.cli.common import add_inference_arguments, load_from_args  # noqa: E402
from andromeda.inference.quantize import quantize  # noqa: E402
from andromeda.plan import format_lora_plan, lora_plan  # noqa: E402
from andromeda.tokenizers import ByteTokenizer  # noqa: E402
from andromeda.train import TrainConfig, train  # noqa: E402
from andromeda.train.lora import lora_model  # noqa: E402
from andromeda.train.optim import build_optimizer  # noqa: E402
from helpers import CORPUS_TEXT, random_net  # noqa: E402

TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


class Interrupted(Exception):
    """Raised by the pause hook: the run dies between steps, as if killed."""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base checkpoint and a 4-step LoRA run over it (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("lora")
    save_pretrained(random_net(), root / "base", tokenizer=ByteTokenizer())
    (root / "corpus.txt").write_text(CORPUS_TEXT)
    config = TrainConfig(out=str(root / "run"), init_from=str(root / "base"), lora_rank=4, lora_dropout=0.1,
                         data=(str(root / "corpus.txt"),), batch_size=8, seq_len=32, max_steps=4, save_every=2,
                         warmup_steps=0, lr=2e-2, min_lr=2e-2, eval_batches=0, log_every=1, device="cpu",
                         progress=False, cache_dir=str(root / "cache"))
    train(config)
    return root, config


def config_of(root):
    return open_model_source(root / "base").config


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


def logits(net) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(TOKENS)


def test_lora_trains_only_the_adapters_and_saves_them_in_peft_format(lora_run):
    from torch.distributed.checkpoint import FileSystemReader

    root, config = lora_run
    checkpoint = latest_checkpoint(root / "run")
    trained = losses(root / "run")
    assert len(trained) == 4 and trained[-1] < trained[0]
    # The checkpoint holds the adapter, listed in its manifest, and no copy of the base.
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert set(ADAPTER_FILES) <= set(manifest) and "model.safetensors" not in manifest
    base = json.loads((checkpoint / "adapter_base.json").read_text())
    assert base["path"] == str((root / "base").resolve())
    assert base["sha256"] == json.loads((root / "base" / "manifest.json").read_text())["files"][
        "model.safetensors"]["sha256"]
    settings = json.loads((checkpoint / "adapter_config.json").read_text())
    assert (settings["peft_type"], settings["r"], settings["lora_alpha"]) == ("LORA", 4, 8.0)
    assert settings["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert all(name.startswith("base_model.model.model.layers.") for name in adapter)
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0  # B left zero
    # Only adapter parameters have AdamW moments.
    state = FileSystemReader(checkpoint / "optimizer").read_metadata().state_dict_metadata
    moments = [name for name in state if name.endswith(".exp_avg")]
    assert moments and all(".lora_" in name for name in moments)
    assert len(moments) == 2 * 4 * 2  # A and B of 4 modules in each of 2 layers
    # The model a run trains: the base frozen, the adapters alone in the optimizer.
    net = lora_model(open_model_source(root / "base"), config_of(root), config, torch.device("cpu"))
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert len(trainable) == 16 and all(".lora_" in name for name in trainable)
    in_optimizer = {id(p) for group in build_optimizer(net, config).param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in net.parameters() if p.requires_grad}


def test_an_interrupted_lora_run_resumes_bit_for_bit(lora_run, tmp_path):
    root, config = lora_run

    def die_after_step_3(name, *until):
        if name == "after-step:3":
            raise Interrupted

    interrupted = config.replace(out=str(tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(interrupted, pause=die_after_step_3)
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    train(interrupted.replace(resume=True))
    assert losses(tmp_path / "run") == losses(root / "run")
    straight = load_file(latest_checkpoint(root / "run") / "adapter_model.safetensors")
    resumed = load_file(latest_checkpoint(tmp_path / "run") / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_adapter_applied_loaded_with_lora_and_merged_give_the_same_logits(lora_run, tmp_path):
    root, config = lora_run
    run, base = root / "run", open_model_source(root / "base")
    applied = lora_model(base, base.config, config, torch.device("cpu"), resume_from=latest_checkpoint(run))
    expected = logits(applied)
    assert not torch.allclose(expected, logits(load_transformer(base)), atol=1e-3)  # the adapter matters

    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    loaded = load_from_args(base, parser.parse_args(["--lora", str(run)]), torch.device("cpu"), decoding=False)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)

    assert main(["merge-lora", "--checkpoint", str(root / "base"), "--lora", str(run), "--out",
                 str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(load_transformer(tmp_path / "merged")), expected, atol=1e-5, rtol=1e-5)
    # The base's chat template goes along (the same weights saved with one: the adapter still fits).
    from andromeda.serve.chat_template import find_chat_template

    save_pretrained(load_transformer(base), tmp_path / "chat-base", tokenizer=ByteTokenizer(), chat_template="{{ x }}")
    assert main(["merge-lora", "--checkpoint", str(tmp_path / "chat-base"), "--lora", str(run), "--out",
                 str(tmp_path / "chat-merged")]) == 0
    assert find_chat_template(tmp_path / "chat-merged") == "{{ x }}"
    # merge-lora never writes over a folder that is not a checkpoint.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert main(["merge-lora", "--checkpoint", str(root / "base"), "--lora", str(run), "--out",
                 str(tmp_path / "notes")]) == 1
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_peft_over_the_hugging_face_export_computes_our_adapted_model(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from andromeda.interop.hf import export_hf

    root, config = lora_run
    checkpoint = latest_checkpoint(root / "run")
    base = open_model_source(root / "base")
    expected = logits(lora_model(base, base.config, config, torch.device("cpu"), resume_from=checkpoint))
    export_hf(load_transformer(base), ByteTokenizer(), tmp_path / "hf")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
        adapted = peft.PeftModel.from_pretrained(hf, checkpoint).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    with torch.no_grad():
        torch.testing.assert_close(adapted(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_lora_input_is_refused_by_name(lora_run, tmp_path, capsys):
    root, config = lora_run
    run = root / "run"
    common = ["train", "--out", str(tmp_path / "x"), "--init-from", str(root / "base"), "--max-steps", "1"]
    assert main([*common, "--lora-rank", "0"]) == 1
    assert "lora_rank (--lora-rank) must be >= 1, got 0" in capsys.readouterr().err
    assert main([*common, "--lora-rank", "2", "--lora-targets", "qkv,mlp"]) == 1
    assert "must name distinct layers among qkv, out, ff_in, ff_out, got qkv, mlp" in capsys.readouterr().err
    assert main([*common, "--quantize", "int8"]) == 1
    assert "give --lora-rank too" in capsys.readouterr().err
    # Another base of the same shape: the recorded hash names both.
    save_pretrained(random_net(seed=1), tmp_path / "other", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match=rf"trained on {root / 'base'}.*not on {tmp_path / 'other'}"):
        attach_lora(open_model_source(tmp_path / "other"), run)
    # An adapter without its base record (as peft writes one) over a model of another shape.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(latest_checkpoint(run) / name, bare / name)
    save_pretrained(random_net(dim=32), tmp_path / "narrow", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(4, 256\), this model needs \(4, 128\).*another shape"):
        attach_lora(open_model_source(tmp_path / "narrow"), bare)
    # An unknown tensor name in an adapter.
    tensors = load_file(bare / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, bare / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head.lora_A.weight' is no LoRA weight of this model"):
        attach_lora(open_model_source(root / "base"), bare)
    # The run's checkpoint itself holds no model: the message says how to load it.
    with pytest.raises(FileNotFoundError, match=rf"holds a LoRA adapter, not a model.*--checkpoint .*base --lora"):
        load_transformer(run)


def test_qlora_trains_over_an_int8_checkpoint_and_runs_beside_it(lora_run, tmp_path, capsys):
    """QLoRA: the frozen base stays int8 (its kernel has no backward; the adapters' gradients pass
    through the dequantized weight, also across the layers no adapter wraps); the adapter then runs
    beside the int8 weights as it loads. 16 rows per step: the int8 kernel's path, not the slabs'."""
    root, config = lora_run
    net = load_transformer(root / "base")
    quantize(net, "int8")
    save_pretrained(net, tmp_path / "int8", tokenizer=ByteTokenizer())
    qlora = config.replace(out=str(tmp_path / "run"), init_from=str(tmp_path / "int8"), max_steps=3, save_every=3,
                           batch_size=2, seq_len=8, lora_targets=("qkv", "ff_out"))
    train(qlora)
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    checkpoint = latest_checkpoint(tmp_path / "run")
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0  # reached layer 0
    base = open_model_source(tmp_path / "int8")
    expected = logits(lora_model(base, base.config, qlora, torch.device("cpu"), resume_from=checkpoint))
    loaded = load_transformer(attach_lora(base, tmp_path / "run"))
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    assert main(["merge-lora", "--checkpoint", str(tmp_path / "int8"), "--lora", str(tmp_path / "run"), "--out",
                 str(tmp_path / "merged")]) == 1
    assert "int8-quantized weights, which take no merge" in capsys.readouterr().err
    # int4 too: a one-step run over the full-precision base, quantized as it loads.
    train(qlora.replace(out=str(tmp_path / "int4"), init_from=str(root / "base"), quantize="int4", max_steps=1,
                        save_every=1))
    step = load_file(latest_checkpoint(tmp_path / "int4") / "adapter_model.safetensors")
    assert step["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_plan_prices_the_base_and_adapters_a_lora_run_holds(lora_run, scheme):
    """`plan --lora-rank`'s state bytes equal what `train --lora-rank --bf16` builds (activations
    are the full plan's estimate, checked in test_plan)."""
    root, config = lora_run
    base = open_model_source(root / "base")
    run = config.replace(bf16=True, quantize=scheme, lora_targets=("qkv", "ff_in"))
    net = lora_model(base, base.config, run, torch.device("cpu"))
    estimate = lora_plan(base.config, config.lora_rank, run.lora_targets, scheme, seq_len=32)
    frozen = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()] if not t.requires_grad)
    adapters = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert (estimate.frozen_bytes, estimate.adapter_params) == (frozen, adapters)
    assert estimate.adapter_bytes == 16 * adapters
    assert "rank 4 on qkv, ff_in" in format_lora_plan(estimate)


def test_serve_and_lm_eval_take_the_adapter(lora_run, tmp_path):
    """serve checks the adapter against its checkpoint before it binds a port; lm-eval's model
    loads merged, with the logits of `--lora` in the other commands."""
    from andromeda.interop.lm_eval import load_model
    from andromeda.serve.config import ServeConfig
    from andromeda.serve.server import serve

    root, _ = lora_run
    run = root / "run"
    save_pretrained(random_net(seed=1), tmp_path / "other", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match=rf"trained on {root / 'base'}.*not on {tmp_path / 'other'}"):
        serve(tmp_path / "other", ServeConfig(port=0), lora=run)
    scored, _ = load_model(root / "base", torch.device("cpu"), torch.float32, lora=run)
    expected = load_transformer(attach_lora(open_model_source(root / "base"), run))
    torch.testing.assert_close(logits(scored), logits(expected), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(scored), logits(load_transformer(root / "base")), atol=1e-4)


def test_an_adapter_file_linked_out_of_its_folder_is_refused(lora_run, tmp_path):
    """The adapter's files are read from its folder only: a link out of it (here to another
    adapter's weights) is refused by name, as a checkpoint's are."""
    from andromeda.folders import UnsafeFileError

    root, _ = lora_run
    source = latest_checkpoint(root / "run")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(source / "adapter_config.json", adapter / "adapter_config.json")
    (adapter / "adapter_model.safetensors").symlink_to(source / "adapter_model.safetensors")
    with pytest.raises(UnsafeFileError, match="adapter_model.safetensors"):
        attach_lora(open_model_source(root / "base"), adapter)

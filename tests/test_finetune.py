"""Fine-tuning: --init-from a trained checkpoint (weights, config and tokenizer taken from it, a
fresh optimizer and schedule), and prompt/completion data with the loss on completions only."""

from __future__ import annotations

import json

import pytest
import torch

from andromeda.checkpoint import OPTIMIZER_DIR, latest_checkpoint, load_checkpoint_tokenizer, load_transformer
from andromeda.inference.generate import generate
from andromeda.model import IGNORE_INDEX
from andromeda.parallel.dcp import load_optimizer
from andromeda.tokenizers import ByteTokenizer
from andromeda.train import TrainConfig, train
from andromeda.train.optim import build_optimizer
from andromeda.train.sft import completion_batch, load_completion_examples
from helpers import tiny_train_config

QA = [("What colour is snow?", " white"), ("What colour is coal?", " black"), ("What colour is grass?", " green"),
      ("What colour is the sky?", " blue")]


@pytest.fixture
def pretrained(tmp_path, corpus):
    result = train(tiny_train_config(tmp_path, corpus, out=str(tmp_path / "base"), tokenizer="bpe",
                                     bpe_vocab_size=300, max_steps=4, eval_batches=0))
    return result.checkpoint


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    return path


def test_init_from_starts_from_the_checkpoints_weights_with_a_fresh_optimizer(tmp_path, corpus, pretrained):
    config = tiny_train_config(tmp_path, corpus, out=str(tmp_path / "tuned"), preset=None, model_overrides={},
                               init_from=str(pretrained), max_steps=1, eval_batches=0, lr=1e-12, min_lr=0.0,
                               warmup_steps=0)
    train(config)
    base, tuned = load_transformer(pretrained), load_transformer(tmp_path / "tuned")
    assert base.config == tuned.config  # the checkpoint's model, BPE vocabulary included
    for name, tensor in base.state_dict().items():  # one step at lr ~0: the same weights
        torch.testing.assert_close(tuned.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    text = "the lazy dog"
    assert load_checkpoint_tokenizer(tmp_path / "tuned").encode(text) == load_checkpoint_tokenizer(pretrained).encode(text)
    checkpoint = latest_checkpoint(tmp_path / "tuned")
    optimizer = build_optimizer(tuned, TrainConfig.from_dict(json.loads((checkpoint / "train_config.json").read_text())))
    load_optimizer(checkpoint / OPTIMIZER_DIR, tuned, optimizer)
    assert {int(s["step"]) for s in optimizer.state.values()} == {1}  # AdamW started over


def test_init_from_refuses_shape_changes_and_accepts_the_rest(tmp_path, corpus, pretrained):
    base = tiny_train_config(tmp_path, corpus, out=str(tmp_path / "tuned"), preset=None, model_overrides={},
                             init_from=str(pretrained), max_steps=1, eval_batches=0)
    with pytest.raises(ValueError, match=r"depth=4 \(the checkpoint has 2\).* would change the shape"):
        train(base.replace(model_overrides={"depth": 4}))
    with pytest.raises(ValueError, match=r"dim=192 \(the checkpoint has 64\)"):
        train(base.replace(preset="demo"))
    train(base.replace(model_overrides={"attn_flash": False}))  # a path, not a shape: allowed
    assert load_transformer(tmp_path / "tuned").config.attn_flash is False
    # A fine-tune resumes like any run (here: already finished, so nothing is trained).
    assert train(base.replace(resume=True, model_overrides={"attn_flash": False})).step == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(base.replace(out=str(tmp_path / "other"), init_from=str(tmp_path / "nowhere")))


def test_completion_batches_target_only_the_completion(records):
    tokenizer = ByteTokenizer()
    examples = load_completion_examples([records], tokenizer)
    inputs, targets = completion_batch(examples, step=0, batch_size=4, seq_len=40, seed=0, pad_id=tokenizer.pad_id)
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        text = tokenizer.decode(row_in)
        prompt, answer = next((q, a) for q, a in QA if text.startswith(q))
        wanted = tokenizer.encode(answer) + [tokenizer.eos_id]
        assert [t for t in row_t if t != IGNORE_INDEX] == wanted  # only the completion and its eos
        first = row_t.index(wanted[0])
        assert first == len(tokenizer.encode(prompt))  # predicted from the last prompt position
        assert all(t == IGNORE_INDEX for t in row_t[:first])


def test_prompt_tokens_get_no_gradient(records):
    """The hidden state at a prompt position affects nothing the loss counts: its gradient is 0;
    completion positions get one."""
    torch.manual_seed(0)
    net = load_transformer_free()
    tokenizer = ByteTokenizer()
    inputs, targets = completion_batch(load_completion_examples([records], tokenizer), 0, 4, 40, 0, tokenizer.pad_id)
    grads = {}

    def keep_gradient(module, args, out):  # the final-normed hidden states' gradient, (B, T, C)
        out.register_hook(lambda grad: grads.setdefault("h", grad))

    net.final_norm.register_forward_hook(keep_gradient)
    net(inputs, targets=targets).backward()
    per_position = grads["h"].abs().sum(-1)  # (B, T)
    counted = targets != IGNORE_INDEX
    assert per_position[~counted].max() == 0
    assert (per_position[counted] > 0).all()


def load_transformer_free():
    from andromeda import Andromeda

    return Andromeda.from_config("tiny", max_seq_len=64).Andromeda


def test_a_model_learns_the_completions(tmp_path, records):
    result = train(tiny_train_config(tmp_path, records, objective="completion", data=(str(records),),
                                     eval_data=(str(records),), max_steps=60, batch_size=8, seq_len=40, lr=1e-2,
                                     warmup_steps=5, eval_every=60, save_every=60))
    assert result.eval["loss"] < 0.3  # nats per completion token, from ~5.5 at the start
    net, tokenizer = load_transformer(result.checkpoint), ByteTokenizer()
    for question, answer in QA:
        prompt = torch.tensor([tokenizer.eos_id, *tokenizer.encode(question)])
        new = generate(net, prompt, len(answer.encode()) + 1, temperature=0, eos_token=tokenizer.eos_id)[0]
        assert tokenizer.decode(new) == answer


def test_bad_completion_records_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "only"}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: expected string fields 'prompt' and 'completion'"):
        load_completion_examples([bad], ByteTokenizer())
    text = tmp_path / "plain.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="reads .jsonl files"):
        load_completion_examples([text], ByteTokenizer())

"""`andromeda generate`'s options, in process on tiny checkpoints: stop strings, several samples,
prompts from a file or stdin, penalties, int4 group sizes that fit the model, the --compile notice."""

from __future__ import annotations

import importlib
import io
import logging
import re

import pytest
import torch

from andromeda import Andromeda, cli
from andromeda.checkpoint import save_pretrained
from andromeda.cli.generate import COMPILING
from andromeda.inference.generate import generate
from andromeda.tokenizers import ByteTokenizer
from helpers import random_net

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id
PROMPT = "Once upon"
# The module itself (the package's `generate` attribute is the function).
generate_module = importlib.import_module("andromeda.inference.generate")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate-options") / "tiny"
    save_pretrained(random_net(), folder, tokenizer=TOKENIZER)
    return folder


@pytest.fixture(scope="module")
def net():
    return random_net().eval()


def run_generate(capsys, checkpoint, *options: str) -> str:
    capsys.readouterr()
    code = cli.main(["generate", "--checkpoint", str(checkpoint), "--device", "cpu", "--max-new-tokens", "40",
                     *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def greedy(net, prompt: str, n: int, **penalties) -> str:
    """What the library gives: the greedy continuation up to eos, decoded."""
    ids = [EOS] + TOKENIZER.encode(prompt)
    out = generate(net, torch.tensor(ids), n, temperature=0, eos_token=EOS, **penalties)[0].tolist()
    return TOKENIZER.decode(out[: out.index(EOS)] if EOS in out else out)


# ----------------------------------------------------------------------------- --stop


def test_stop_ends_the_text_right_before_the_stop_string(checkpoint, capsys):
    full = run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0")
    text = full[len(PROMPT) : -1]
    # Stop strings of two whole characters (two tokens or more) from inside the text.
    starts = [i for i in range(1, len(text) - 2) if "\ufffd" not in text[i : i + 2]]
    first, later = text[starts[0] : starts[0] + 2], text[starts[-1] : starts[-1] + 2]
    assert text.index(later) > text.index(first) > 0
    out = run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0", "--stop", later)
    assert out == PROMPT + text[: text.index(later)] + "\n"
    # Several stop strings: the first one in the text wins, whatever their order.
    out = run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0", "--stop", "never there",
                       "--stop", later, "--stop", first)
    assert out == PROMPT + text[: text.index(first)] + "\n"


# ----------------------------------------------------------------------------- -n


def test_num_samples_are_the_runs_with_seed_plus_i(checkpoint, capsys):
    out = run_generate(capsys, checkpoint, "--prompt", PROMPT, "-n", "3", "--seed", "0")
    parts = re.split(r"=== sample (\d)/3 \(seed (\d)\) ===\n", out)
    assert parts[0] == "" and parts[1::3] == ["1", "2", "3"] and parts[2::3] == ["0", "1", "2"]
    samples = parts[3::3]
    alone = [run_generate(capsys, checkpoint, "--prompt", PROMPT, "--seed", str(seed)) for seed in range(3)]
    assert samples == alone
    assert len(set(samples)) == 3, "three seeds should give three texts"


def test_num_samples_must_be_positive(checkpoint, capsys):
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "-n", "0"]) == 2
    assert "-n/--num-samples: must be an integer >= 1, got '0'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- prompt sources


def test_prompt_file_and_stdin_give_the_prompts_output(checkpoint, capsys, tmp_path, monkeypatch):
    text = "Grüße,\nworld"
    expected = run_generate(capsys, checkpoint, "--prompt", text, "--seed", "4")
    file = tmp_path / "prompt.txt"
    file.write_text(text + "\n")  # the newline an editor adds is dropped
    assert run_generate(capsys, checkpoint, "--prompt-file", str(file), "--seed", "4") == expected
    for flag in ("--prompt", "--prompt-file"):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode() + b"\n")))
        assert run_generate(capsys, checkpoint, flag, "-", "--seed", "4") == expected


def test_unreadable_prompt_files_are_named(checkpoint, capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    for path, words in [(tmp_path / "missing.txt", "cannot read the prompt from"), (bad, "is not UTF-8 text")]:
        assert cli.main(["generate", "--checkpoint", str(checkpoint), "--prompt-file", str(path)]) == 1
        err = capsys.readouterr().err
        assert words in err and str(path) in err, err
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a", "--prompt-file", "b"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- penalties


def test_penalty_flags_give_the_librarys_penalized_text(checkpoint, net, capsys):
    penalties = dict(frequency_penalty=0.8, presence_penalty=0.3, repetition_penalty=1.3)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in penalties.items()]
    out = run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0", *flags)
    assert out == PROMPT + greedy(net, PROMPT, 40, **penalties) + "\n"
    assert out != PROMPT + greedy(net, PROMPT, 40) + "\n", "the penalties changed nothing"


@pytest.mark.parametrize("flag, value, words", [("--frequency-penalty", "2.5", "[-2, 2]"),
                                                ("--presence-penalty", "-3", "[-2, 2]"),
                                                ("--repetition-penalty", "0", "> 0")])
def test_out_of_range_penalties_are_named_by_their_flag(checkpoint, capsys, flag, value, words):
    assert cli.main(["generate", "--checkpoint", str(checkpoint), f"{flag}={value}"]) == 1
    err = capsys.readouterr().err
    assert f"{flag}: {flag[2:].replace('-', '_')} must be" in err and words in err, err


# ----------------------------------------------------------------------------- --quantize int4


def test_int4_picks_a_group_size_that_divides_a_192_wide_model(tmp_path, capsys, caplog):
    folder = tmp_path / "demo"
    torch.manual_seed(0)
    save_pretrained(Andromeda.from_config("demo", depth=1).Andromeda, folder, tokenizer=TOKENIZER)
    caplog.set_level(logging.INFO, logger="andromeda")
    options = ["--prompt", PROMPT, "--temperature", "0", "--quantize", "int4"]
    out = run_generate(capsys, folder, *options)
    assert "int4-quantized (group size 64)" in caplog.text  # 128 does not divide 192; 64 does
    assert run_generate(capsys, folder, *options, "--group-size", "64") == out
    # A group size the user asks for is kept, and refused when it does not fit.
    assert cli.main(["generate", "--checkpoint", str(folder), "--device", "cpu", *options, "--group-size", "128"]) == 1
    assert "int4 group size 128 does not divide the input width 192" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --compile


def test_compile_says_it_is_compiling_before_it_compiles(checkpoint, capsys, caplog, monkeypatch):
    """Compiling on a CPU takes too long for a test: the compiled step is replaced by the eager
    one, which records whether the notice came first."""
    notices_at_first_step = []

    def eager_step():
        def step(net, tokens, cache_step):
            notices_at_first_step.append(caplog.text.count(COMPILING))
            return generate_module._forward_step(net, tokens, cache_step)
        return step

    monkeypatch.setattr(generate_module, "_compiled_step", eager_step)
    caplog.set_level(logging.INFO, logger="andromeda")
    out = run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0", "--compile", "-n", "2")
    assert notices_at_first_step and notices_at_first_step[0] == 1 and caplog.text.count(COMPILING) == 1
    eager = run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0")
    assert out == f"=== sample 1/2 (seed 0) ===\n{eager}=== sample 2/2 (seed 1) ===\n{eager}"
    assert caplog.text.count(COMPILING) == 1  # not without --compile


def test_compile_takes_prepacked_weights_unpacked_and_refuses_quantized_ones(checkpoint, capsys, monkeypatch):
    """On a CPU, bf16 weights may load prepacked, which Inductor cannot lower: `--compile` unpacks
    them first (the compiled step sees the rows kernel's Linears where it runs, else plain ones),
    the library names the fix, and int4 weights without their VNNI kernel (groups of 32) are
    refused with a reason."""
    from andromeda.inference.bf16_linear import Bf16RowsLinear
    from andromeda.inference.native import bf16_rows_kernel
    from andromeda.inference.packed import PackedLinear, packing_supported, prepack

    if not packing_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels: nothing is prepacked")
    seen = []

    def eager_step():
        def step(net, tokens, cache_step):
            seen.append({type(m) for m in net.modules()})
            return generate_module._forward_step(net, tokens, cache_step)
        return step

    monkeypatch.setattr(generate_module, "_compiled_step", eager_step)
    run_generate(capsys, checkpoint, "--prompt", PROMPT, "--temperature", "0", "--compile", "--dtype", "bf16")
    assert seen and not any(PackedLinear in kinds for kinds in seen)
    assert all((Bf16RowsLinear in kinds) == bf16_rows_kernel() for kinds in seen)
    packed = prepack(random_net(dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"unpack\(model\) first"):
        generate(packed, [[1, 2]], 2, compile=True)
    code = cli.main(["generate", "--checkpoint", str(checkpoint), "--device", "cpu", "--quantize", "int4",
                     "--group-size", "32", "--prompt", PROMPT, "--compile"])
    err = capsys.readouterr().err
    assert code != 0 and "Int4Linear layer" in err and "no VNNI decoding kernel" in err

"""Hugging Face interop: an exported folder, loaded by transformers' own Auto classes with no
andromeda code, computes our model (logits, greedy generation, tokenizer, pipeline), and imports
back bit for bit; other folders are refused with errors naming the file and the problem."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from andromeda import Andromeda, Config  # noqa: E402
from andromeda.interop.hf import (  # noqa: E402
    export_hf,
    import_hf,
    load_hf,
    load_hf_tokenizer,
    load_transformers,
    require_transformers,
)
from andromeda.inference.generate import stream_text  # noqa: E402
from andromeda.tokenizers import ByteTokenizer, HFTokenizer, tokenizer_fingerprint, train_bpe  # noqa: E402
from helpers import FEATURE_MIXES  # noqa: E402

TINY = Config.from_preset("tiny", max_seq_len=160)


TEXTS = [
    "Grüße → naïve café ✓ 日本語, über alles!",
    "  two  spaces . and\ttabs\n new line ",
    "emoji 🙂🙃 and a literal <|endoftext|> and <|pad|>",
    "",
]


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def perturbed(config: Config) -> Andromeda:
    """Every weight moved off its init (as test_model does), so no term hides behind ones/zeros."""
    model = Andromeda.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def scaled(seed: int = 0, **overrides) -> Andromeda:
    """Matrices scaled up from the 0.02-std init (test_generation's random_net): greedy choices
    then depend on the context instead of repeating one token."""
    torch.manual_seed(seed)
    model = Andromeda.from_config("tiny", **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def left_padded(prompts: list[torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- the folder


def test_export_writes_a_self_contained_folder(tmp_path):
    model = perturbed(TINY)
    folder = export_hf(model, ByteTokenizer(), tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "configuration_andromeda.py", "generation_config.json", "model.safetensors",
        "modeling_andromeda.py", "tokenizer.json", "tokenizer_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "andromeda"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_andromeda.AndromedaForCausalLM"
    expected = dict(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=160, intermediate_size=256,
                    alibi=True, alibi_num_heads=2, rotary_xpos=True, qk_norm=True, qk_norm_dim_scale=True)
    assert {k: config[k] for k in expected} == expected
    for name in ("configuration_andromeda.py", "modeling_andromeda.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= {"__future__", "math", "dataclasses", "torch", "transformers"}, imported
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 257, "do_sample": False}


@pytest.mark.parametrize("mix", sorted(FEATURE_MIXES))
def test_logits_match_ours(mix, tmp_path):
    config = TINY.replace(**FEATURE_MIXES[mix])
    model = perturbed(config)
    hf = hf_model(export_hf(model, ByteTokenizer(), tmp_path / "hf"))
    tokens = torch.randint(0, config.num_tokens, (2, 150))
    with torch.no_grad():
        expected = model.Andromeda(tokens)
        torch.testing.assert_close(hf(tokens).logits, expected, atol=1e-5, rtol=1e-5)
        # The same call spelled out: all-ones mask, explicit positions, only the last logits.
        out = hf(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                 position_ids=torch.arange(150)[None], logits_to_keep=7, use_cache=False)
        torch.testing.assert_close(out.logits, expected[:, -7:], atol=1e-5, rtol=1e-5)
        # Left padding: positions come from the mask, so each row is computed as if alone.
        rows = [tokens[0, :150], tokens[1, :61]]
        batch = left_padded(rows, pad=0)
        padded = hf(**batch).logits
        for row, prompt in enumerate(rows):
            alone = model.Andromeda(prompt[None])[0]
            torch.testing.assert_close(padded[row, 150 - len(prompt):], alone, atol=1e-5, rtol=1e-5)


def test_long_inputs_attend_in_blocks_of_rows(tmp_path):
    """Past 512 queries the scores are computed a block of rows at a time."""
    model = perturbed(Config.from_preset("tiny"))  # max_seq_len 1024
    hf = hf_model(export_hf(model, ByteTokenizer(), tmp_path / "hf"))
    tokens = torch.randint(0, 258, (1, 700))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.Andromeda(tokens), atol=1e-5, rtol=1e-5)


def test_a_fresh_model_builds_from_the_exported_config(tmp_path):
    folder = export_hf(perturbed(TINY), ByteTokenizer(), tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    fresh = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    loaded = hf_model(folder)
    shapes = {name: tuple(p.shape) for name, p in loaded.state_dict().items()}
    assert {name: tuple(p.shape) for name, p in fresh.state_dict().items()} == shapes
    assert torch.equal(fresh.model.layers[0].self_attn.q_scale, torch.full((4, 16), 16**0.25))


@pytest.mark.parametrize("mix", ["seed", "abs-pos-with-rotary", "one-kv-head-3-alibi"])
def test_cached_steps_match_one_pass(mix, tmp_path):
    """Prefill then decode with transformers' DynamicCache equals one uncached pass, for a
    left-padded batch; the cache holds only the key/value heads."""
    config = TINY.replace(**FEATURE_MIXES[mix])
    hf = hf_model(export_hf(perturbed(config), ByteTokenizer(), tmp_path / "hf"))
    full = left_padded([torch.randint(0, 256, (n,)) for n in (30, 22)], pad=257)
    with torch.no_grad():
        expected = hf(**full, use_cache=False).logits
        cache = transformers.DynamicCache(config=hf.config)
        step = 24
        logits = [hf(input_ids=full["input_ids"][:, :step], attention_mask=full["attention_mask"][:, :step],
                     cache=cache, use_cache=True).logits]
        for end in range(step + 1, 31):
            # The cache under its name before transformers 5.x, `past_key_values`, works too.
            logits.append(hf(input_ids=full["input_ids"][:, end - 1 : end],
                             attention_mask=full["attention_mask"][:, :end], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, atol=1e-5, rtol=1e-5)
    keys = cache.layers[0].keys
    assert keys.shape == (2, config.attn_kv_heads, 30, config.dim_head)


# ----------------------------------------------------------------------------- generation

GENERATION_MIXES = {
    "seed": {},
    "abs-pos": dict(use_abs_pos_emb=True),
    "one-kv-head": dict(attn_kv_heads=1),
    "reference-attention": dict(attn_flash=False),
}


@pytest.mark.parametrize("mix", sorted(GENERATION_MIXES))
def test_greedy_generate_matches_ours(mix, tmp_path):
    """transformers' generate, with and without its cache, one prompt or a left-padded batch of
    different lengths, returns exactly the tokens of our greedy generate (eos stops a row, which
    then holds pad)."""
    model, tokenizer = scaled(**GENERATION_MIXES[mix]), ByteTokenizer()
    hf = hf_model(export_hf(model, tokenizer, tmp_path / "hf"))
    prompts = [torch.randint(0, 256, (n,)) for n in (7, 12, 3)]
    expected = model.decoder.generate(prompts, 16, temperature=0, eos_token=tokenizer.eos_id,
                                      pad_value=tokenizer.pad_id)  # (3, 16)
    assert len(set(expected.flatten().tolist())) >= 12, "degenerate greedy output proves little"

    def new_tokens(out: torch.Tensor, start: int) -> torch.Tensor:
        new = out[:, start:]
        return torch.nn.functional.pad(new, (0, 16 - new.shape[1]), value=tokenizer.pad_id)

    for use_cache in (True, False):
        for prompt, row in zip(prompts, expected):
            out = hf.generate(prompt[None], max_new_tokens=16, do_sample=False, use_cache=use_cache)
            assert torch.equal(new_tokens(out, len(prompt))[0], row), (use_cache, prompt)
        batch = left_padded(prompts, tokenizer.pad_id)
        out = hf.generate(**batch, max_new_tokens=16, do_sample=False, use_cache=use_cache)
        assert torch.equal(new_tokens(out, batch["input_ids"].shape[1]), expected), use_cache
    out = hf.generate(**batch, max_new_tokens=16, do_sample=False, cache_implementation="static")
    assert torch.equal(new_tokens(out, batch["input_ids"].shape[1]), expected), "static cache"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_transformers_continues_a_prompt_as_andromeda_generate_does(kind, tmp_path):
    """The plain transformers calls, `tokenizer(prompt)` then `generate` with the folder's defaults,
    and the text-generation pipeline, give `andromeda generate`'s greedy text: the tokenizer opens
    the document with eos as `stream_text` does, and generation_config.json asks for greedy."""
    tokenizer = _tokenizers()[kind]
    model = scaled(seed=3, num_tokens=320)
    hf, hf_tokenizer = load_transformers(export_hf(model, tokenizer, tmp_path / "hf"))
    for prompt in ("Grüße, Andromeda:", "hello wor"):
        ours = "".join(stream_text(model.Andromeda, tokenizer, prompt, 16, temperature=0))
        assert len(set(ours)) >= 5, "degenerate greedy output proves little"
        inputs = hf_tokenizer(prompt, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == [tokenizer.eos_id, *tokenizer.encode(prompt)]
        out = hf.generate(**inputs, max_new_tokens=16)
        assert hf_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == ours
        generator = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tokenizer, device="cpu")
        [result] = generator(prompt, max_new_tokens=16)
        assert result["generated_text"] == prompt + ours


def test_the_tokenizer_loads_without_asking_about_custom_code(tmp_path, monkeypatch):
    """AutoTokenizer with trust_remote_code=False, and load_transformers, never ask "Do you wish to
    run the custom code?" (a question that blocks a notebook) and load transformers' own class."""
    folder = export_hf(perturbed(TINY), ByteTokenizer(), tmp_path / "hf")
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "n")
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 15)  # asking enabled
    plain = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    _, loaded = load_transformers(folder)
    assert questions == []
    for hf_tokenizer in (plain, loaded):
        assert type(hf_tokenizer).__module__.startswith("transformers.")
        assert hf_tokenizer("hi")["input_ids"] == [256, *b"hi"]


# ----------------------------------------------------------------------------- tokenizer


def _tokenizers():
    bpe = train_bpe(["Grüße aus Köln, naïve café. " * 20, "hello world, hello there " * 20], vocab_size=320)
    return {"byte": ByteTokenizer(), "bpe": bpe}


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_matches_ours(kind, tmp_path, monkeypatch):
    tokenizer = _tokenizers()[kind]
    model = Andromeda.from_config("tiny", num_tokens=max(258, tokenizer.vocab_size))
    folder = export_hf(model, tokenizer, tmp_path / "hf")
    # The plain call, as a script would make it: transformers declines the config's custom code
    # (a non-interactive answer) and still loads the tokenizer from its own files.
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, text
        # With special tokens (the default) a text opens a document, after eos, as in generate.
        assert hf_tokenizer(text)["input_ids"] == [tokenizer.eos_id, *ids], text
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    if kind == "byte":
        assert hf_tokenizer.encode("<|endoftext|>", add_special_tokens=False) == list(b"<|endoftext|>")
        assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in TEXTS)
    rng = random.Random(0)  # any ids, including cut-off UTF-8 and specials, decode alike
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(12))]
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), ids
    back = load_hf_tokenizer(folder)
    assert type(back) is type(tokenizer)
    if isinstance(back, HFTokenizer):
        assert back.name == tokenizer.name
    assert all(back.encode(t) == tokenizer.encode(t) for t in TEXTS)
    # The very tokenizer comes back (the exported file's eos template is the export's own).
    assert tokenizer_fingerprint(back) == tokenizer_fingerprint(tokenizer)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("mix", ["seed", "reference-attention", "only-attn_qk_norm", "abs-pos-with-rotary",
                                 "no-qk-norm"])
def test_round_trip_is_bit_identical(mix, tmp_path):
    config = TINY.replace(**FEATURE_MIXES[mix])
    model = perturbed(config)
    folder = export_hf(model, ByteTokenizer(), tmp_path / "hf")
    back_config, state, tokenizer = import_hf(folder)
    assert back_config == config
    assert isinstance(tokenizer, ByteTokenizer)
    original = model.Andromeda.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    loaded = load_hf(folder)
    tokens = torch.randint(0, config.num_tokens, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model.Andromeda(tokens))
    # The seed's face and the checkpoint loader read the folder too.
    face = Andromeda.from_pretrained(folder)
    assert all(torch.equal(t, original[n]) for n, t in face.Andromeda.state_dict().items())
    again = export_hf(loaded, tokenizer, tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_round_trip_through_transformers_and_bf16(tmp_path):
    """A folder re-saved by transformers itself imports back, and a bf16 export stays bf16."""
    model = perturbed(TINY)
    folder = export_hf(model, ByteTokenizer(), tmp_path / "hf")
    hf_model(folder).save_pretrained(tmp_path / "resaved")
    _, state, _ = import_hf(tmp_path / "resaved")
    assert all(torch.equal(state[n], t) for n, t in model.Andromeda.state_dict().items())
    half = export_hf(model, ByteTokenizer(), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    _, state, _ = import_hf(half)
    assert all(state[n].dtype == torch.bfloat16 and torch.equal(state[n], t.bfloat16())
               for n, t in model.Andromeda.state_dict().items())


def test_other_architectures_are_refused(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                                                n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"gpt2/config\.json: model_type 'gpt2'.*not an Andromeda model"):
        import_hf(tmp_path / "gpt2")
    ours = tmp_path / "ours"
    Andromeda.from_config(TINY).save_pretrained(ours)
    with pytest.raises(ValueError, match="Andromeda checkpoint's config, not a Hugging Face export"):
        import_hf(ours)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf(tmp_path / "nowhere")


def test_mismatched_folders_are_refused(tmp_path):
    folder = export_hf(perturbed(TINY), ByteTokenizer(), tmp_path / "hf")
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "hidden_size": 32, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*config\.json: shape mismatches: "
                                         r"lm_head\.weight: \(258, 64\) in model\.safetensors, \(258, 32\)"):
        import_hf(folder)
    config_file.write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"config\.json: intermediate_size \(100\) must be a multiple"):
        import_hf(folder)
    config_file.write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=r"config\.json: .*divisible by Config\.attn_kv_heads"):
        import_hf(folder)
    config_file.write_text(json.dumps(config))
    tensors = load_file(weights_file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"):
        import_hf(folder)
    weights_file.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        import_hf(folder)


def test_export_never_replaces_an_unrelated_folder(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy exists and is not a Hugging Face export"):
        export_hf(perturbed(TINY), ByteTokenizer(), busy)
    assert (busy / "notes.txt").read_text() == "mine"
    folder = export_hf(perturbed(TINY), None, tmp_path / "hf")
    export_hf(perturbed(TINY), ByteTokenizer(), folder)  # an earlier export is replaced
    assert (folder / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- extras


def test_core_never_imports_the_extras():
    code = ("import sys, andromeda, andromeda.interop, andromeda.interop.hf; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'lm_eval'}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]' in the andromeda checkout"):
        require_transformers()


def test_export_and_import_commands_round_trip(tmp_path, capsys):
    from andromeda import cli
    from andromeda.checkpoint import load_checkpoint_tokenizer, load_transformer

    model = perturbed(Config.from_preset("tiny"))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=ByteTokenizer())
    assert cli.main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert cli.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    original, back = load_transformer(tmp_path / "ckpt").state_dict(), load_transformer(tmp_path / "back").state_dict()
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())
    assert isinstance(load_checkpoint_tokenizer(tmp_path / "back"), ByteTokenizer)
    assert cli.main(["import-hf", "--hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x")]) == 1
    assert "not a Hugging Face export" in capsys.readouterr().err

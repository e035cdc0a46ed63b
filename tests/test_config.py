import inspect
import json

import pytest
import torch

from andromeda import PRESETS, Andromeda, Config
from andromeda.config import SEED_FIELDS

SEED_DEFAULTS = dict(
    num_tokens=50432, max_seq_len=8192, dim=2560, depth=32, dim_head=128, heads=24,
    use_abs_pos_emb=False, alibi_pos_bias=True, alibi_num_heads=12, rotary_xpos=True,
    attn_flash=True, attn_kv_heads=2, qk_norm=True, attn_qk_norm=True, attn_qk_norm_dim_scale=True,
)


def test_seed_signature_is_exact():
    params = inspect.signature(Andromeda.__init__).parameters
    assert list(params)[1:] == list(SEED_DEFAULTS)
    assert {name: p.default for name, p in params.items() if name != "self"} == SEED_DEFAULTS
    assert SEED_FIELDS == tuple(SEED_DEFAULTS)


def test_default_model_size_on_meta_device():
    with torch.device("meta"):
        model = Andromeda()
    # x-transformers 2.31.10 built with the same hyperparameters has exactly this many.
    assert model.num_parameters() == 2_481_875_456
    assert all(p.is_meta for p in model.parameters())
    for name, value in SEED_DEFAULTS.items():
        assert getattr(model, name) == value
    assert model.Andromeda is model.decoder.net


def test_attributes_read_back_what_was_passed():
    model = Andromeda(num_tokens=300, max_seq_len=64, dim=32, depth=1, dim_head=8, heads=4,
                      alibi_num_heads=1, attn_kv_heads=1, attn_flash=False, use_abs_pos_emb=True)
    assert (model.num_tokens, model.dim, model.heads, model.alibi_num_heads) == (300, 32, 4, 1)
    assert model.attn_flash is False and model.use_abs_pos_emb is True
    assert model.config == Config(num_tokens=300, max_seq_len=64, dim=32, depth=1, dim_head=8,
                                  heads=4, alibi_num_heads=1, attn_kv_heads=1, attn_flash=False,
                                  use_abs_pos_emb=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    config = Config.from_preset(name)
    assert Config.from_json(config.to_json()) == config
    config.to_json(tmp_path / "config.json")
    assert Config.from_json(tmp_path) == config
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_published_presets_match_the_original_project():
    sizes = {name: (c.dim, c.depth, c.heads, c.alibi_num_heads)
             for name in ("1b", "3b", "7b", "10b", "15b", "20b")
             for c in [Config.from_preset(name)]}
    assert sizes == {"1b": (2048, 16, 8, 4), "3b": (3072, 24, 12, 6), "7b": (4096, 32, 16, 8),
                     "10b": (5120, 32, 20, 4), "15b": (6144, 40, 24, 4), "20b": (7168, 48, 28, 4)}
    one = Config.from_preset("1b")
    assert (one.num_tokens, one.max_seq_len) == (25000, 4192)
    for name in ("3b", "7b", "20b"):
        c = Config.from_preset(name)
        assert (c.num_tokens, c.max_seq_len, c.dim_head, c.attn_kv_heads) == (50432, 8192, 128, 2)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(num_tokens="wrong_type"), TypeError, "num_tokens"),
    (dict(dim=64.0), TypeError, "dim"),
    (dict(depth=True), TypeError, "depth"),
    (dict(rotary_xpos=1), TypeError, "rotary_xpos"),
    (dict(heads=24, attn_kv_heads=5), ValueError, "divisible"),
    (dict(heads=8, alibi_num_heads=9), ValueError, "alibi_num_heads"),
    (dict(dim=0), ValueError, "dim must be positive"),
    (dict(max_seq_len=-1), ValueError, "max_seq_len"),
    (dict(dim_head=18), ValueError, "multiple of 4"),
])
def test_inconsistent_config_is_rejected_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        with torch.device("meta"):
            Andromeda(**kwargs)


def test_unknown_fields_and_presets_are_named():
    with pytest.raises(ValueError, match="unknown Config fields \\['dimm'\\]"):
        Config.from_dict({"dimm": 3})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Config.from_preset("huge")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Config.from_json("/nonexistent/folder")


def test_bf16_build_has_no_fp32_weights():
    model = Andromeda.from_config("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())

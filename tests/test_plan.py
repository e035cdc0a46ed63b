"""`andromeda.plan`: exact parameter counts, FLOPs in the PaLM convention, per-GPU memory under
FSDP2 full sharding, activation estimates checked against the tensors autograd really saves, and
no allocation on the way."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from andromeda import Config, PRESETS, build_transformer
from andromeda.interop import build_x_transformers
from andromeda.plan import GIB, USABLE_FRACTION, block_activation_bytes, format_plan, plan

TINY = Config.from_preset("tiny")
SEVEN_B = Config.from_preset("7b")


def x_transformers_param_count(config: Config) -> int:
    """x-transformers' own count for the same hyperparameters, built on the meta device."""
    pytest.importorskip("x_transformers")
    with torch.device("meta"):
        model = build_x_transformers(config)
    return sum(p.numel() for p in model.parameters())


def test_default_preset_has_the_x_transformers_parameter_count():
    p = plan(Config())
    assert p.params == 2_481_875_456
    assert p.embedding_params == 50432 * 2560
    assert p.non_embedding_params == 2_481_875_456 - 50432 * 2560


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_count_matches_meta_model_and_x_transformers(preset):
    config = Config.from_preset(preset)
    net = build_transformer(config, device="meta")
    assert all(p.is_meta for p in net.parameters())
    assert plan(config, seq_len=128).params == sum(p.numel() for p in net.parameters())
    assert plan(config, seq_len=128).params == x_transformers_param_count(config)


def test_absolute_positions_count_as_embedding():
    config = TINY.replace(use_abs_pos_emb=True)
    p = plan(config)
    assert p.embedding_params == (config.num_tokens + config.max_seq_len) * config.dim
    assert p.params == build_transformer(config, device="meta").num_parameters()


class TensorDevices(TorchFunctionMode):
    """Records the device of every tensor any torch function produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


def test_planning_20b_allocates_nothing():
    config = Config.from_preset("20b")  # 23 B parameters: 92 GB in fp32 if anything were real
    with TensorDevices() as log:
        p = plan(config, gpus=64, seq_len=8192)
    assert p.params > 23e9
    assert log.devices == {"meta"}  # every tensor made on the way was shapes only


def test_the_allocation_check_sees_a_real_tensor():
    with TensorDevices() as log:
        torch.zeros(3)
    assert log.devices == {"cpu"}


def test_sharded_terms_scale_with_one_over_gpus_and_the_rest_does_not():
    one, two, eight = (plan(SEVEN_B, gpus=g, seq_len=4096) for g in (1, 2, 8))
    for name in ("sharded_params_bytes", "sharded_grads_bytes", "optimizer_bytes"):
        assert getattr(one, name) / getattr(eight, name) == pytest.approx(8, rel=1e-4)
    for name in ("activation_bytes", "checkpointed_activation_bytes", "loss_bytes"):
        assert getattr(one, name) == getattr(eight, name)
    assert two.gathered_bytes == eight.gathered_bytes  # FSDP's transient units do not shard
    # One GPU is one process under autocast, no FSDP: every matmul weight's bf16 copy at once.
    assert one.gathered_bytes == 2 * one.non_embedding_params
    # The fp32 policy: 4 + 4 + 8 bytes per parameter when nothing is sharded.
    assert one.sharded_params_bytes == 4 * one.params
    assert one.sharded_grads_bytes == 4 * one.params
    assert one.optimizer_bytes == 8 * one.params


def test_activation_checkpointing_shrinks_activations_and_sets_the_total():
    base = plan(SEVEN_B, gpus=8, seq_len=8192, batch=2)
    assert base.checkpointed_activation_bytes < base.activation_bytes / 4
    on = plan(SEVEN_B, gpus=8, seq_len=8192, batch=2, activation_checkpointing=True)
    off = plan(SEVEN_B, gpus=8, seq_len=8192, batch=2, activation_checkpointing=False)
    assert on.total_bytes == on.state_bytes + on.checkpointed_activation_bytes
    assert off.total_bytes == off.state_bytes + off.activation_bytes
    assert on.total_bytes < off.total_bytes
    # Left to decide, it turns checkpointing on exactly when the run does not fit without it.
    assert base.activation_checkpointing == (off.total_bytes > off.usable_bytes)


def test_flash_activations_are_linear_in_tokens_and_the_reference_path_quadratic():
    assert block_activation_bytes(SEVEN_B, 1, 4096, 2) == 2 * block_activation_bytes(SEVEN_B, 1, 2048, 2)
    reference = SEVEN_B.replace(attn_flash=False)
    excess = block_activation_bytes(reference, 1, 4096, 2) - 2 * block_activation_bytes(reference, 1, 2048, 2)
    # The kept probabilities: H per token per key, fp32 softmax plus its bf16 cast.
    assert excess == reference.heads * (4096**2 - 2 * 2048**2) * (4 + 2)


def test_training_flops_are_6n_plus_palm_attention_term():
    c = SEVEN_B
    attention = 12 * c.depth * c.heads * c.dim_head  # per token of context
    short = plan(c, seq_len=1)
    assert short.train_flops_per_token == 6 * short.non_embedding_params + attention
    assert short.train_flops_per_token == pytest.approx(6 * short.non_embedding_params, rel=1e-4)
    long = plan(c, seq_len=8192)
    assert long.train_flops_per_token - short.train_flops_per_token == attention * 8191
    assert long.train_flops_per_token == 3 * long.forward_flops_per_token


def saved_bytes_of_forward(config: Config, batch: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves for backward in a bf16 forward, weights aside."""
    net = build_transformer(config, dtype=torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, config.num_tokens, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(tokens, return_hidden=True)
    return sum(saved.values())


@pytest.mark.parametrize("mix", [
    {}, dict(alibi_pos_bias=False), dict(rotary_xpos=False), dict(qk_norm=False, attn_qk_norm=False),
    dict(attn_qk_norm_dim_scale=False), dict(attn_kv_heads=4), dict(dim_head=32),
    dict(attn_flash=False),
    dict(qk_norm=False, attn_qk_norm=False, rotary_xpos=False, alibi_pos_bias=False),
], ids=["seed", "no-alibi", "no-xpos", "no-qk-norm", "qk-norm-fixed-scale", "multi-head-kv",
        "head-32", "reference-attention", "bare"])
def test_block_estimate_matches_tensors_saved_by_a_real_block(mix):
    torch.manual_seed(0)
    config = TINY.replace(**mix)
    batch, seq_len = 2, 96
    # Two blocks minus one block isolates one block's share from the embedding and final norm.
    measured = (saved_bytes_of_forward(config.replace(depth=2), batch, seq_len)
                - saved_bytes_of_forward(config.replace(depth=1), batch, seq_len))
    # On CPU LayerNorm keeps its statistics in bf16 rather than fp32, and the estimate counts
    # 2 bytes per head channel more than this CPU build keeps: within 2.5% covers both.
    estimate = block_activation_bytes(config, batch, seq_len, width=2, device_type="cpu")
    assert estimate == pytest.approx(measured, rel=0.025)


def test_recommendation_names_the_gpus_that_make_20b_fit():
    config = Config.from_preset("20b")
    p = plan(config, gpus=1, seq_len=8192)
    assert p.recommendation.startswith("does not fit")
    needed = int(p.recommendation.split("use at least ")[1].split(" GPUs")[0])
    assert plan(config, gpus=needed, seq_len=8192, activation_checkpointing=True).total_bytes <= p.usable_bytes
    assert plan(config, gpus=needed - 1, seq_len=8192,
                activation_checkpointing=True).total_bytes > p.usable_bytes
    assert plan(TINY).recommendation.startswith("fits in 80 GiB of GPU memory (72.0 GiB usable) "
                                                "without activation checkpointing")


def test_smaller_card_changes_the_verdict():
    p = plan(SEVEN_B, gpus=8, seq_len=8192, gpu_memory_gib=40)
    assert p.usable_bytes == int(40 * GIB * USABLE_FRACTION)
    assert p.recommendation.startswith("turn activation checkpointing on")
    assert p.activation_checkpointing


def test_format_plan_reports_units_and_the_throughput_estimate():
    p = plan(SEVEN_B, gpus=8, seq_len=8192)
    text = format_plan(p, peak_tflops=989.0, mfu=0.4)
    assert "5.31 B total: 206.57 M embedding" in text
    assert f"training {p.train_flops_per_token / 1e9:.2f} GFLOP/token" in text
    tokens_per_s = 989e12 * 0.4 / p.train_flops_per_token
    assert f"~{tokens_per_s:,.0f} tokens/s per GPU at 40% MFU of 989 TFLOP/s" in text
    assert "an estimate, not a measurement" in text
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert total_line.split()[1:] == [f"{p.total_bytes_with(False) / GIB:.1f}",
                                      f"{p.total_bytes_with(True) / GIB:.1f}"]
    assert text.endswith(f"recommendation: {p.recommendation}")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(gpus=0), ValueError, "gpus must be >= 1, got 0"),
    (dict(batch=0), ValueError, "batch (sequences per GPU per micro-step) must be >= 1, got 0"),
    (dict(seq_len=1025), ValueError, "seq_len must be in 1..max_seq_len (1024), got 1025"),
    (dict(seq_len=0), ValueError, "seq_len must be in 1..max_seq_len (1024), got 0"),
    (dict(dtype="fp8"), ValueError, "dtype must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'"),
    (dict(gpus=2.0), TypeError, "gpus must be an int, got 2.0 (float)"),
    (dict(activation_checkpointing="yes"), TypeError, "activation_checkpointing must be True"),
    (dict(gpu_memory_gib=float("inf")), ValueError, "gpu_memory_gib must be a positive, finite number of GiB "
                                                    "(e.g. 80), got inf"),
    (dict(gpu_memory_gib=float("nan")), ValueError, "gpu_memory_gib must be a positive, finite number of GiB"),
    (dict(gpu_memory_gib=1e300), ValueError, "gpu_memory_gib must be a positive, finite number of GiB"),
    (dict(gpu_memory_gib=0), ValueError, "gpu_memory_gib must be a positive, finite number of GiB"),
])
def test_invalid_inputs_are_named(kwargs, error, message):
    with pytest.raises(error) as info:
        plan(TINY, **kwargs)
    assert message in str(info.value)


def test_config_is_a_config_or_a_preset_name():
    assert plan("7b", seq_len=1024) == plan(SEVEN_B, seq_len=1024)
    with pytest.raises(TypeError, match="config must be an andromeda.Config or a preset name, got dict"):
        plan(SEVEN_B.to_dict())
    with pytest.raises(ValueError, match="unknown preset '8b'"):
        plan("8b")


@pytest.mark.parametrize("kwargs, message", [
    (dict(peak_tflops=0.0), "peak_tflops must be a positive, finite number of TFLOP/s (e.g. 989), got 0.0"),
    (dict(peak_tflops=float("nan")), "peak_tflops must be a positive, finite number of TFLOP/s"),
    (dict(peak_tflops=-1.0), "peak_tflops must be a positive, finite number of TFLOP/s"),
    (dict(peak_tflops=float("inf")), "peak_tflops must be a positive, finite number of TFLOP/s"),
    (dict(mfu=1.5), "mfu must be a fraction in (0, 1] (e.g. 0.4), got 1.5"),
    (dict(mfu=0.0), "mfu must be a fraction in (0, 1]"),
])
def test_a_throughput_estimate_needs_a_real_peak_and_utilisation(kwargs, message):
    """No ZeroDivisionError, and no "~nan tokens/s" or negative throughput printed as a result."""
    p = plan(TINY)
    with pytest.raises(ValueError) as info:
        format_plan(p, **kwargs)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        p.tokens_per_second(**kwargs)

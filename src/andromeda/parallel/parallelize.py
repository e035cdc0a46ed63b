"""DDP or FSDP2 over a Transformer, applied from outside the model; activation checkpointing;
the gradient norm over shards; the whole model's state dict for a consolidated checkpoint.

- ddp: `DistributedDataParallel` over the Transformer, whose forward computes the loss.
- fsdp: FSDP2 (`fully_shard`; Zhao et al. 2023, https://arxiv.org/abs/2304.11277), one unit per
  Block plus the root (embedding, final norm, to_logits). Each process keeps 1/W of the weights,
  gradients and AdamW moments.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CHECKPOINT, WEIGHTS_FILE, ModelSource, load_transformer, open_model_source
from ..choices import PARALLEL_MODES
from ..inference.packed import inference_only_modules
from ..config import Config
from ..model import Transformer, build_transformer
from ..weights import SafetensorsFile, shape_problems
from .environment import DistEnv


def _check_mode(mode: str, env: DistEnv) -> None:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; expected one of {', '.join(PARALLEL_MODES)}")
    if env.distributed and mode == "none":
        raise ValueError(f"{env.world_size} processes were launched but the parallel mode is 'none'; "
                         f"pass --parallel ddp or --parallel fsdp")


def check_parallel_setup(mode: str, batch_size: int, grad_accum: int, env: DistEnv) -> None:
    """Raise a ValueError unless `mode` fits the processes launched and the global batch splits
    evenly: only when every micro-batch of every process holds the same number of sequences is
    the mean of their mean losses the mean over the global batch."""
    _check_mode(mode, env)
    if batch_size % (env.world_size * grad_accum):
        raise ValueError(
            f"batch size {batch_size} does not split evenly over {env.world_size} processes x {grad_accum} "
            f"accumulation micro-steps; use a --batch-size that is a multiple of "
            f"{env.world_size * grad_accum}"
        )


# --------------------------------------------------------------------------- parallelism


def apply_activation_checkpointing(net: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them
    (Chen et al. 2016, https://arxiv.org/abs/1604.06174): memory per block drops to its input.

    Applied from outside the model, as torchtitan does: each block's `forward` is wrapped, so the
    parameters and the state dict are untouched and FSDP's hooks (on the module call) still run.
    Non-reentrant checkpointing, PyTorch's recommended mode, which also handles the keyword-free
    dataclass argument.
    """
    for block in net.blocks:
        if getattr(block, "_checkpointed", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block._checkpointed = True


COMPILE_SCOPES = ("blocks", "model")


# What `train --compile` compiles: each block, in every mode and process count (torchtitan's way:
# FSDP's units are the blocks, and DDP's bucketed gradient hooks would split one graph anyway).
# Measured on CPU (Intel Xeon with AMX, one thread, 4 x 1024 tokens, bf16 autocast; eager and both
# scopes interleaved, `benchmarks/bench_train.py --compile`): each block 1.00x eager at dim 512 and
# 0.99x at the 2.5 B default's width (two layers); the whole model, loss included, 0.97x and 0.81x.
# The whole model once ran 1.2x eager, before the eager step got its C kernels (the loss's softmax,
# attention and its QK-norm/rotary prologue), which a compiled graph keeps as opaque ops anyway.
TRAIN_COMPILE_SCOPE = "blocks"


def apply_compile(net: Transformer, scope: str) -> None:
    """torch.compile `net` from outside, in place: its whole forward, the loss included, as one
    graph ("model"), or each Block ("blocks"; inside activation checkpointing, before FSDP; the
    loss and the cache logic stay eager)."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}; expected one of {', '.join(COMPILE_SCOPES)}")
    if scope == "model":
        net.compile()
        return
    for block in net.blocks:
        block.compile()


def parallelize(
    net: Transformer,
    mode: str,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile: str | None = None,
) -> nn.Module:
    """Apply `mode` ("none", "ddp" or "fsdp") to `net`; returns the module to call for the loss,
    `train_module(inputs, targets=targets)`.

    With one process every mode is the plain Transformer. "ddp" returns a DistributedDataParallel
    around `net`. "fsdp" shards `net` in place (it may still be on the meta device; see
    `build_parallel_model`) and returns it: one FSDP2 unit per Block, one per LayerNorm, and the
    root (embedding, final norm, output projection). Shards, gradient reduction and the optimizer
    stay fp32. With `param_dtype` (torch.bfloat16 for --bf16) the Blocks' weights are gathered in
    that dtype, while the norms and the root are gathered in fp32: run the forward under
    autocast, as one process does, and the residual stream, the norms and the loss stay fp32 as
    they do there. (The QK-norm scales belong to their Block's unit: they compute rounded to
    bf16, the one difference from single-process autocast.) gloo all-gathers bf16 on the CPU as
    NCCL does on GPUs.

    `compile` ("blocks" or "model", see `apply_compile` and `TRAIN_COMPILE_SCOPE`) applies torch.compile;
    "model" only where `net` is not sharded (FSDP's hooks sit on the blocks).
    """
    _check_mode(mode, env)
    frozen = inference_only_modules(net)
    if frozen:
        raise ValueError(f"the model holds inference-only layers ({frozen[0]}: {type(net.get_submodule(frozen[0])).__name__}"
                         f"{' and more' if len(frozen) > 1 else ''}): quantized, prepacked or row-tiled weights cannot be "
                         f"trained or parallelized; load the full-precision checkpoint")
    if compile == "model" and env.distributed and mode == "fsdp":
        raise ValueError("FSDP shards each block: compile the blocks (compile='blocks'), not the whole model")
    if activation_checkpointing:
        apply_activation_checkpointing(net)
    if compile is not None:
        apply_compile(net, compile)
    if not env.distributed or mode == "none":
        return net
    if mode == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=device_ids)
    # cast_forward_inputs=False: inputs arrive in the dtype they should have (the residual stream
    # fp32, autocast casting for the matmuls); casting would also round the fp32 xPos tables and
    # ALiBi slopes in AttentionInputs.
    compute = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    full = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in net.blocks:
        fully_shard(block.attn_norm, mp_policy=full)
        fully_shard(block.ff_norm, mp_policy=full)
        fully_shard(block, mp_policy=compute)
    fully_shard(net, mp_policy=full)
    return net


def build_parallel_model(
    config: Config,
    mode: str,
    env: DistEnv,
    *,
    init: Callable[[torch.device], Transformer] | None = None,
    checkpoint: ModelSource | Path | None = None,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile: str | None = None,
) -> tuple[Transformer, nn.Module]:
    """The Transformer with the weights of `checkpoint` (a model folder or its `ModelSource`), or
    from `init(device)` (a fresh initialisation), in fp32, and the module to call for the loss (see
    `parallelize`).

    Under "fsdp" over several processes the model is built on the meta device and sharded first.
    From a checkpoint, each process then reads only its own shard of every tensor from
    model.safetensors: no process, CPU or GPU, ever holds the whole model. A fresh initialisation
    is built by rank 0 in host memory (the same weights a single process starts from, so the loss
    curve does not depend on the process count) and each process receives its shards; the GPUs
    never hold the whole model. A Hugging Face export, whose tensors are renamed and joined as they
    load, is read by rank 0 alone and shared out as an initialisation is.
    """
    if (init is None) == (checkpoint is None):
        raise ValueError("build_parallel_model needs exactly one of init and checkpoint")
    if checkpoint is not None:
        checkpoint = open_model_source(checkpoint, verify=False)
        if checkpoint.kind != CHECKPOINT and mode == "fsdp" and env.distributed:
            source, checkpoint = checkpoint, None
            init = functools.partial(_load, source, config)
    if mode != "fsdp" or not env.distributed:
        net = init(env.device) if checkpoint is None else _load(checkpoint, config, env.device)
        return net, parallelize(net, mode, env, param_dtype=param_dtype,
                                activation_checkpointing=activation_checkpointing, compile=compile)
    full_state = init(torch.device("cpu")).state_dict() if checkpoint is None and env.is_main else {}
    net = build_transformer(config, device="meta")
    train_module = parallelize(net, mode, env, param_dtype=param_dtype,
                               activation_checkpointing=activation_checkpointing, compile=compile)
    net.to_empty(device=env.device)
    if checkpoint is not None:
        load_shards(net, checkpoint.folder)
    else:
        set_model_state_dict(net, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return net, train_module


def _load(source: ModelSource, config: Config, device: torch.device) -> Transformer:
    """`source`'s weights in fp32 in a model of `config`, which may differ from the saved one in
    anything but the weights' names and shapes (attn_flash, say, for --init-from)."""
    net = load_transformer(source, device=device, dtype=torch.float32, verify=False)
    if net.config == config:
        return net
    rebuilt = build_transformer(config, device="meta")
    rebuilt.load_state_dict(net.state_dict(), strict=True, assign=True)
    return rebuilt.train()


@torch.no_grad()
def load_shards(net: nn.Module, checkpoint: Path) -> None:
    """Fill a sharded model's parameters from the checkpoint folder's model.safetensors, reading
    only the rows of each tensor this process holds (FSDP2 shards the first dimension)."""
    state = net.state_dict()
    with SafetensorsFile(Path(checkpoint) / WEIGHTS_FILE) as weights:
        where = {name: WEIGHTS_FILE for name in weights.entries}
        problems = shape_problems(weights.shapes(), {name: tuple(t.shape) for name, t in state.items()}, where)
        if problems:
            raise ValueError(f"{weights.path} does not match the model: {problems}")
        for name, tensor in state.items():
            if not isinstance(tensor, DTensor):
                tensor.copy_(weights.read(name))
                continue
            shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            if tuple(shape[1:]) == tuple(tensor.shape[1:]):  # whole rows: read only those
                local = weights.read_rows(name, offset[0], offset[0] + shape[0])
            else:
                local = weights.read(name)[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
            tensor.to_local().copy_(local)


def is_sharded(net: nn.Module) -> bool:
    return isinstance(net, FSDPModule)


@contextlib.contextmanager
def gradient_sync(train_module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on the micro-steps that only accumulate.

    FSDP reduce-scatters after every micro-step instead: skipping it would keep whole unsharded
    gradients on every process, which is the memory FSDP exists to save.
    """
    if enabled or not isinstance(train_module, DistributedDataParallel):
        yield
        return
    with train_module.no_sync():
        yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """The global gradient norm (a 0-d tensor on the parameters' device: reading it is left to the
    caller, so a step waits for the device once), over the shards of all processes; clips to
    `max_norm` if finite.

    Under FSDP each gradient is a DTensor shard: the norm is reduced over the processes
    (`full_tensor`) before the clip coefficient is formed, so every process scales by the same
    factor a single process would.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def full_model_state_dict(net: nn.Module, env: DistEnv) -> dict[str, Tensor]:
    """The whole model's state dict on rank 0's CPU (other processes get {}). Collective under
    FSDP: the shards are gathered one tensor at a time and each is moved to the CPU at once, so
    the device holds at most one gathered tensor beyond its shards."""
    if is_sharded(net):
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return {}
    return {name: t.detach().cpu() for name, t in net.state_dict().items()}

"""LoRA fine-tuning through `peft` (Hu et al. 2021, https://arxiv.org/abs/2106.09685): low-rank
adapters on a block's Linear layers, trained while every weight of the base stays frozen; QLoRA
(Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) when that base is int8 or int4.

`peft` wraps nn.Linear modules by name (`inject_adapter_in_model`), and the model honours swapped
Linears: the fused feed-forward and the fused loss call any module that is not a plain nn.Linear
(`model.fused.is_plain_linear`), so an adapted layer computes base(x) + scaling * B(A(dropout(x))).
The output projection (to_logits) is never adapted. Only the adapter parameters require gradients,
so only they get AdamW state. Checkpoints hold the adapter as peft saves it, under the exported
model's names (`checkpoint.lora`), and point to the base by path and weights hash.

QLoRA: the base's Linears are `inference.quantized_linear`'s Int8Linear / Int4Linear, whose kernels
have no backward. `QuantizedLoraLinear` (registered with peft as the LoRA layer of those modules)
runs the frozen product through `_FrozenProduct`, whose backward is grad_x = grad_y @ W with W
dequantized one layer at a time, so gradients reach the adapters of earlier layers; the quantized
Linears no adapter wraps (the output projection, layers outside --lora-targets) go through it too
(`FrozenQuantizedLinear`). Its forward runs without autograd, so no dequantized weight is kept. Both int8 and
int4 work this way; the base keeps its quantized dtype (bf16 activations by default).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from ..checkpoint import (
    ModelSource,
    from_hf_adapter_state,
    hf_target_modules,
    load_transformer,
    open_adapter,
    open_model_source,
    read_adapter,
    write_adapter,
)
from ..checkpoint.lora import base_weights_sha256, lora_module_name
from ..choices import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES
from ..config import Config
from ..inference.quantized_linear import QuantizedLinear
from ..model import Transformer, build_transformer
from .config import TrainConfig

PEFT_EXTRA = ("LoRA fine-tuning needs peft: pip install -e '.[lora]' in the andromeda checkout (PyPI's andromeda "
              "is an unrelated project)")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(PEFT_EXTRA) from None
    return peft


def lora_config(config: TrainConfig, *, exported: bool = False):
    """peft's LoraConfig of the run: its target modules as our blocks name them, or (`exported`)
    as the Hugging Face export names them, which is what adapter_config.json records."""
    peft = _peft()
    targets = hf_target_modules(config.lora_targets) if exported else \
        sorted(lora_module_name(t) for t in config.lora_targets)
    settings = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                               target_modules=targets, bias="none", task_type="CAUSAL_LM" if exported else None)
    if not exported:
        settings._register_custom_module({kind: quantized_lora_layer() for kind in QuantizedLinear})
    return settings


class _FrozenProduct(torch.autograd.Function):
    """module(x) for a frozen quantized Linear, with the backward its kernel lacks: the gradient
    of the input only, through the dequantized weight (the weight itself never trains)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module) -> Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        return module(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        weight = ctx.module.dequantized()  # (N, K) fp32, one layer's worth, freed on return
        grad_x = grad_y.to(weight.dtype) @ weight  # (..., K)
        return grad_x.to(ctx.x_dtype), None


class FrozenQuantizedLinear(nn.Module):
    """A quantized Linear no adapter wraps (the output projection, layers outside --lora-targets),
    run through `_FrozenProduct` so gradients pass it to the adapters below."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenProduct.apply(x, self.base)
        return self.base(x)


def freeze_quantized_products(net: nn.Module) -> None:
    """Wrap every quantized Linear that no LoRA layer holds in a FrozenQuantizedLinear, in place."""
    lora_layer = quantized_lora_layer()
    for parent in list(net.modules()):
        if isinstance(parent, (lora_layer, FrozenQuantizedLinear)):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(parent, name, FrozenQuantizedLinear(child))


@functools.cache
def quantized_lora_layer() -> type:
    """peft's LoRA layer over an Int8Linear / Int4Linear (built once, when peft is imported)."""
    from peft.tuners.lora import LoraLayer

    class QuantizedLoraLinear(nn.Module, LoraLayer):
        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x: Tensor) -> Tensor:
            base = self.get_base_layer()
            tracked = torch.is_grad_enabled() and x.requires_grad
            result = _FrozenProduct.apply(x, base) if tracked else base(x)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                update = b(a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]
                result = result + update.to(result.dtype)  # the residual stream keeps the base's dtype
            return result

    return QuantizedLoraLinear


def add_adapters(net: Transformer, config: TrainConfig) -> Transformer:
    """Wrap `net`'s target Linears with fresh LoRA adapters (A random, B zero: the model computes
    what the base does until it trains), freezing every base weight; in place."""
    peft = _peft()
    with warnings.catch_warnings():  # peft warns of any layer it does not know, QuantizedLoraLinear's too
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        net = peft.inject_adapter_in_model(lora_config(config), net)
    for name, param in net.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" in name:  # peft makes them in the base weight's dtype; AdamW wants fp32
            param.data = param.data.float()
    return net


def adapter_state(net: nn.Module) -> dict[str, Tensor]:
    """peft's state dict of the adapter: blocks.i.attn.to_qkv.lora_A.weight, ... (no adapter name)."""
    return {name: t.detach().cpu() for name, t in _peft().get_peft_model_state_dict(net).items()}


def load_adapter_state(net: nn.Module, checkpoint: ModelSource | str) -> None:
    """Load the adapter a LoRA run saved in `checkpoint` into `net`, which `add_adapters` wrapped."""
    folder = checkpoint.folder if isinstance(checkpoint, ModelSource) else checkpoint
    adapter = open_adapter(folder, verify=False)  # the checkpoint was verified whole
    state = from_hf_adapter_state(read_adapter(adapter), adapter.weights_file)
    result = _peft().set_peft_model_state_dict(net, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{adapter.weights_file} does not match this run's adapters (--lora-rank, --lora-targets): "
                         f"unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]}")


def is_qlora(base: ModelSource, config: TrainConfig) -> bool:
    """Whether the run's frozen base is quantized (QLoRA): a quantized --init-from, or --quantize."""
    return base.quantization is not None or config.quantize is not None


def lora_model(base: ModelSource, model_cfg: Config, config: TrainConfig, device: torch.device,
               resume_from: ModelSource | None = None) -> Transformer:
    """The frozen base of a LoRA run on `device`, with its adapters (fp32): fresh (seeded by the
    run's seed) or, resuming, those `resume_from` holds.

    The base's Linear weights are fp32, or bf16 under --bf16 (frozen, they need no fp32 master
    copy, and autocast then makes no bf16 copy of them); embeddings and norms stay fp32, so the
    residual stream does. Under QLoRA they are quantized instead (as saved, or by --quantize, with
    fp32 activations, or bf16 under --bf16)."""
    if base.quantization is not None:
        net = _owned(load_transformer(base, device=device, verify=False))
    elif config.quantize is not None:
        net = _owned(load_transformer(base, device=device, dtype=torch.bfloat16 if config.bf16 else torch.float32,
                                      verify=False, quantize=config.quantize, group_size=int4_group_size(base.config)))
    else:
        # As saved, then each part in the dtype it trains in: a bf16 base under --bf16 takes no
        # fp32 pass, whose copies would double what loading holds (15 GB for the 2.5 B default).
        net = load_transformer(base, device=device, dtype=None if config.bf16 else torch.float32, verify=False)
        if net.config != model_cfg:  # a setting without weights differs (attn_flash, say)
            rebuilt = build_transformer(model_cfg, device="meta")
            rebuilt.load_state_dict(net.state_dict(), strict=True, assign=True)
            net = rebuilt
        for module in net.modules():  # embeddings and norms in fp32: the residual stream is
            if not isinstance(module, nn.Linear):
                _cast(module, torch.float32)
        for module in net.modules():
            if isinstance(module, nn.Linear):
                _cast(module, torch.bfloat16 if config.bf16 else torch.float32)
    torch.manual_seed(config.seed)
    net = add_adapters(net, config)
    if is_qlora(base, config):
        freeze_quantized_products(net)
    if resume_from is not None:
        load_adapter_state(net, resume_from)
    return net.train()


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """`module`'s own floating parameters and buffers in `dtype` (its children untouched)."""
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def _owned(net: nn.Module) -> nn.Module:
    """`net` with every tensor in memory of its own. Quantized as it loads, a model keeps its
    unquantized tensors (embeddings, norms) as views of the checkpoint file's mapping, which then
    stays resident for the whole run (5 GB for the 2.5 B default): copies let it go."""
    for module in net.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensor.data = tensor.data.clone()
    return net


def int4_group_size(model: Config) -> int:
    """--quantize int4's group size: the largest of ATen's sizes up to the default that divides
    every Linear's input width (as `andromeda quantize` picks it)."""
    widths = {model.dim, model.heads * model.dim_head, model.ff_dim}
    fitting = [size for size in INT4_GROUP_SIZES if size <= DEFAULT_GROUP_SIZE and all(w % size == 0 for w in widths)]
    return max(fitting, default=DEFAULT_GROUP_SIZE)


def resumed_base(checkpoint: ModelSource) -> ModelSource:
    """The base a LoRA run's checkpoint records, opened and checked to be the one it trained on."""
    adapter = open_adapter(checkpoint.folder, verify=False)
    if adapter.base_path is None:
        raise ValueError(f"{checkpoint.folder} records no base for its adapter; it cannot resume")
    try:
        base = open_model_source(adapter.base_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"resuming the LoRA run of {checkpoint.folder} needs its base {adapter.base_path}, "
                                f"which no longer exists: put it back there") from None
    found = base_weights_sha256(base)
    if found != adapter.base_sha256:
        raise ValueError(f"the base {adapter.base_path} has changed since the LoRA run of {checkpoint.folder} "
                         f"started (weights SHA-256 {found[:12]}..., recorded {adapter.base_sha256[:12]}...): "
                         f"restore it to resume")
    return base


def write_lora_checkpoint_files(folder, net: nn.Module, config: TrainConfig, base: ModelSource) -> None:
    """The adapter files of a LoRA run's checkpoint (its config, tokenizer and training state are
    written beside them as for any run)."""
    settings = lora_config(config, exported=True).to_dict()  # peft_type and task_type are str enums
    settings["target_modules"] = sorted(settings["target_modules"])
    settings["base_model_name_or_path"] = str(base.folder.resolve())
    write_adapter(folder, adapter_state(net), net.config, settings, base)


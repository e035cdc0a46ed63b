"""The one loader: a `ModelSource` (any model folder, see `source`) to a Transformer and its tokenizer.

    source = open_model_source(path)
    net = load_for_inference(source, device=device, dtype="bf16", quantize="int8")   # generate, eval, serve
    net = load_transformer(source, dtype=torch.float32)     # as saved or cast: export, quantize, --init-from
    tokenizer = load_checkpoint_tokenizer(source)

Every folder loads the same way, gpt-fast's: the weights are validated against the config (names
and shapes, from the safetensors header) before anything is built, the model is built on the meta
device and the tensors are assigned in place, so no memory is spent on a throwaway
initialisation and a bad folder never yields a half-loaded model. Only reading the weights
differs by kind: a checkpoint's model.safetensors as is, a quantized checkpoint layer by layer
(`inference.quantize`), a Hugging Face export through the adapter (`interop.hf`), which renames
(and splits or joins) the tensors.

The dtype policy of inference lives here (`inference_dtype`), and the names of the dtypes the
commands accept (`DTYPES`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ..choices import DTYPE_NAMES
from ..folders import CheckpointError
from ..inference.huge_pages import back_with_huge_pages
from ..inference.packed import prepack_if_supported, prepare_bf16
from ..inference.quantized_linear import pack_for_decoding
from ..inference.quantize import (
    DEFAULT_GROUP_SIZE,
    build_quantized_transformer,
    check_scheme,
    load_quantized_transformer,
    quantize as quantize_model,
)
from ..interop.hf import is_hf_folder, load_hf_tokenizer, read_hf_state_dict
from ..model import Transformer
from ..tokenizers import HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, Tokenizer, load_tokenizer
from ..weights import SafetensorsFile, placed, shape_problems, state_shapes, transformer_from_state
from .files import CONFIG_FILE, WEIGHTS_FILE, describe_quantization, verify_checkpoint
from .lora import apply_adapter_unmerged, describe_adapter_base, is_adapter_only, merge_adapter
from .source import HF_EXPORT, ModelSource, open_model_source, resolve_checkpoint

logger = logging.getLogger(__name__)

# The dtypes the commands' --dtype names.
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


def load_transformer(
    source: str | Path | ModelSource, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
    verify: bool = True, quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
) -> Transformer:
    """Rebuild the model of `source` (any model folder, or its `ModelSource`), in eval mode.

    With `verify`, a checkpoint's config and weights are first checked against its manifest
    (sizes and SHA-256: a corrupted or altered file is named, not loaded); a Hugging Face export
    has no manifest. `dtype` casts floating-point weights; by default they keep the saved dtype.

    A quantized checkpoint (`andromeda quantize`) loads as the quantized model, in its saved
    dtype. `quantize` ("int8" or "int4", with `group_size`) quantizes any other folder as it
    loads (after the `dtype` cast); asked of a checkpoint quantized otherwise, it is an error.
    """
    source = open_model_source(source, verify=verify)
    check_load_request(source, quantize, group_size)
    if verify:
        verify_model_files(source)
    if source.quantization is not None:
        net = _load_quantized(source, device, dtype)
        if source.lora is not None:  # int8/int4 weights take no merge: the adapter runs beside them
            apply_adapter_unmerged(net, source.lora, device)
    else:
        net = transformer_from_state(source.config, _merged_state(source, device, dtype))
        if quantize is not None:
            quantize_model(net, quantize, group_size)
            logger.info("weights quantized as they loaded: %s", describe_quantization((quantize, group_size)))
    logger.info("loaded %s (%s)", source.folder, source.describe() if source.quantization is not None
                else f"{net.num_parameters():,} parameters")
    return net


def check_load_request(source: ModelSource, quantize: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Refuse, before anything is read, a `quantize` request `source` cannot meet: an unknown
    scheme or group size, a group size that does not divide a layer's width, or a scheme other
    than the one a quantized checkpoint holds."""
    if quantize is None:
        return
    check_scheme(quantize, group_size)
    if source.quantization is None:
        build_quantized_transformer(source.config, quantize, group_size)  # every layer's width, on meta
    elif (quantize, group_size if quantize == "int4" else None) != source.quantization:
        raise ValueError(f"{source.folder} is already {source.describe()}; drop --quantize, or quantize the "
                         f"full-precision checkpoint it was made from")


def verify_model_files(source: ModelSource) -> None:
    """Check a checkpoint's config and weights against its manifest (a Hugging Face export has none)."""
    if source.kind != HF_EXPORT:
        verify_checkpoint(source.folder, [CONFIG_FILE, WEIGHTS_FILE])


def _read_state(source: ModelSource, device: torch.device | str | None, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The state dict of a full-precision folder, checked against its config, each tensor placed
    on `device` (cast to `dtype`) as it is read."""
    if source.kind == HF_EXPORT:
        return {name: placed(t, device, dtype) for name, t in read_hf_state_dict(source.folder, source.config).items()}
    weights = _weights_file(source)
    where = {name: "the file" for name in weights.entries}
    problems = shape_problems(weights.shapes(), state_shapes(source.config), where)
    if problems:
        raise CheckpointError(f"{weights.path} does not match {source.folder / CONFIG_FILE}: {problems}")
    return {name: placed(tensor, device, dtype) for name, tensor in weights.mapped().items()}


def _merged_state(source: ModelSource, device: torch.device | str | None, dtype: torch.dtype | None
                  ) -> dict[str, Tensor]:
    """`_read_state`, with the source's LoRA adapter (if any) merged in before the `dtype` cast, so
    each merged weight is rounded once."""
    if source.lora is None:
        return _read_state(source, device, dtype)
    state = _read_state(source, device, None)
    merge_adapter(state, source.lora, source.config)
    logger.info("merged the LoRA adapter %s (rank %d, scaling %g)", source.lora.folder, source.lora.rank,
                source.lora.scaling)
    return {name: placed(t, t.device, dtype) for name, t in state.items()}


def _load_quantized(source: ModelSource, device: torch.device | str | None, dtype: torch.dtype | None) -> Transformer:
    """A quantized checkpoint's model, read layer by layer; it loads in its saved dtype only."""
    weights = _weights_file(source)
    saved = weights.entries.get("token_emb.weight")
    if dtype is not None and saved is not None and saved.dtype != dtype:
        raise ValueError(f"{source.folder} is {source.describe()} with {saved.dtype} scales and activations; it "
                         f"loads in that dtype only (asked for {dtype})")
    try:
        net = load_quantized_transformer(source.config, weights, *source.quantization)
    except CheckpointError:
        raise  # the reader's own: names the file
    except ValueError as err:
        raise CheckpointError(f"{weights.path} does not match {source.folder / CONFIG_FILE}: {err}") from None
    return net.to(device) if device is not None else net


def _weights_file(source: ModelSource) -> SafetensorsFile:
    file = source.folder / WEIGHTS_FILE
    if not file.is_file() and is_adapter_only(source.folder):
        raise FileNotFoundError(f"{source.folder} holds a LoRA adapter, not a model: load its base with the adapter "
                                f"(--checkpoint {describe_adapter_base(source.folder)} --lora {source.path}), or "
                                f"write a plain checkpoint with `andromeda merge-lora`")
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {source.folder} has no {WEIGHTS_FILE} (the weights)")
    return SafetensorsFile(file)


# --------------------------------------------------------------------------- inference


def inference_dtype(source: ModelSource, dtype: str | torch.dtype | None, device: torch.device | str, *,
                    quantize: str | None = None, decoding: bool = True) -> torch.dtype | None:
    """The dtype to load weights in for inference: `dtype` (a DTYPES name or a torch dtype) when
    given; else as saved for a quantized checkpoint (its scales and activations have one dtype);
    else bf16 when quantizing as it loads (its scales and activations) or, for `decoding`
    (token-by-token generation rather than scoring), on CUDA, where every token reads every
    weight; else None: as saved."""
    if dtype is not None:
        return torch_dtype(dtype)
    if source.quantization is not None:
        return None
    if quantize is not None or (decoding and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype given as itself or by its DTYPES name ("fp32", "bf16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_for_inference(source: str | Path | ModelSource, *, device: torch.device | str = "cpu",
                       dtype: str | torch.dtype | None = None, quantize: str | None = None,
                       group_size: int = DEFAULT_GROUP_SIZE, verify: bool = True, decoding: bool = True) -> Transformer:
    """The model of `source` as generate, eval, serve and lm-eval run it: in the dtype
    `inference_dtype` chooses, quantized as it loads if asked, in eval mode, with bf16 weights on
    a CPU read by the bf16 rows kernel where it beats oneDNN (no AMX tiles) and the model is for
    `decoding`, else prepacked for oneDNN
    (`inference.packed.prepare_bf16`: the same products to float32 rounding, up to 3x faster
    per decode step than F.linear), and for `decoding` int8 and int4 weights laid out for the VNNI
    kernels' few-row products (`inference.quantized_linear.pack_for_decoding`); CPU
    weights in 2 MiB pages where Linux has them (`inference.huge_pages`)."""
    source = open_model_source(source, verify=verify)
    chosen = inference_dtype(source, dtype, device, quantize=quantize, decoding=decoding)
    net = load_transformer(source, device=device, dtype=chosen, verify=verify, quantize=quantize,
                           group_size=group_size)
    if decoding:
        pack_for_decoding(net)
    # bf16: the rows kernel for decoding where it beats oneDNN; scoring (all rows at once) keeps oneDNN's prepacked weights,
    # which a many-row product reads as they are (the rows kernel's Linear reads slabs back from tiles)
    net = (prepare_bf16(net) if decoding else prepack_if_supported(net)).eval()
    back_with_huge_pages(net)  # CPU weights streamed every token: 2 MiB pages where Linux has them
    return net


# --------------------------------------------------------------------------- tokenizer


def load_checkpoint_tokenizer(source: str | Path | ModelSource, *, verify: bool = True) -> Tokenizer:
    """The tokenizer stored in a model folder (a checkpoint's, checked against its manifest with
    `verify`; a Hugging Face export's tokenizer.json). FileNotFoundError if it holds none."""
    if isinstance(source, ModelSource):
        folder, exported = source.folder, source.kind == HF_EXPORT
    else:  # a path: only resolved, so a folder without a config still says what it lacks
        folder = resolve_checkpoint(source)
        exported = is_hf_folder(folder)
    if exported:
        tokenizer = load_hf_tokenizer(folder)
        if tokenizer is None:
            raise FileNotFoundError(f"Hugging Face folder {folder} has no tokenizer.json")
        return tokenizer
    if verify:
        verify_checkpoint(folder, [HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE])
    if not ((folder / HF_TOKENIZER_FILE).is_file() or (folder / TOKENIZER_CONFIG_FILE).is_file()):
        raise FileNotFoundError(
            f"checkpoint {folder} has no tokenizer ({HF_TOKENIZER_FILE} or {TOKENIZER_CONFIG_FILE}); "
            f"save it with save_pretrained(model, dir, tokenizer=...)"
        )
    return load_tokenizer(folder)

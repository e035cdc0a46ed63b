"""Hugging Face `transformers` interop: export a model to a folder transformers loads on its own,
and import such a folder back, bit for bit.

    export_hf(model, tokenizer, "hf/")       # config.json, model.safetensors, tokenizer.json, ...
    model = AutoModelForCausalLM.from_pretrained("hf/", trust_remote_code=True)   # no andromeda
    config, state_dict, tokenizer = import_hf("hf/")   # our Config and Transformer state dict

An exported folder holds

    config.json                   AndromedaConfig: standard names (vocab_size, hidden_size,
                                  num_key_value_heads, head_dim, max_position_embeddings, ...),
                                  ALiBi / xPos / QK-norm under their own, auto_map
    configuration_andromeda.py    the config class   } copied from hf_model/: they import only
    modeling_andromeda.py         the model classes  } torch and transformers
    model.safetensors             the weights under transformers-style names (table below)
    generation_config.json        bos / eos / pad ids, and do_sample false: greedy unless asked
    tokenizer.json                a `tokenizers` file: the checkpoint's own, or for the byte
                                  tokenizer a byte-level BPE with no merges whose ids are ours;
                                  its post-processor opens every text with eos (below)
    tokenizer_config.json         AutoTokenizer's settings (add_bos_token, with eos as bos), plus
                                  `andromeda_tokenizer`, which tells `import_hf` which of our
                                  tokenizers to rebuild (and the post-processor it replaced)
    chat_template.jinja           the chat template (also tokenizer_config.json's "chat_template")

Weight names (ours -> exported; i is the block):

    token_emb.weight             model.embed_tokens.weight
    pos_emb.weight               model.embed_positions.weight          (use_abs_pos_emb only)
    blocks.i.attn_norm.weight    model.layers.i.input_layernorm.weight
    blocks.i.attn.to_qkv.weight  model.layers.i.self_attn.{q,k,v}_proj.weight (rows split H, K, K)
    blocks.i.attn.q_scale        model.layers.i.self_attn.q_scale      (H, 1, D) -> (H, D)
    blocks.i.attn.k_scale        model.layers.i.self_attn.k_scale      (K, 1, D) -> (K, D)
    blocks.i.attn.to_out.weight  model.layers.i.self_attn.o_proj.weight
    blocks.i.ff_norm.weight      model.layers.i.post_attention_layernorm.weight
    blocks.i.ff.proj_in.*        model.layers.i.mlp.up_proj.*
    blocks.i.ff.proj_out.*       model.layers.i.mlp.down_proj.*
    final_norm.weight            model.norm.weight
    to_logits.weight             lm_head.weight

Our query rows are already grouped by key/value head (see `attention.query_head_order`), which is
the order transformers' `repeat_kv` expects, so no weight is permuted.

The exported model takes its positions from `position_ids` (by default counted from each row's
first real token, so left-padded batches are exact), fixes xPos' center at
max_position_embeddings // 2 for every call (cached keys stay valid for a cache's whole life), and
caches keys after rotation for the key/value heads only; modeling_andromeda.py explains each.

A document opens as `andromeda generate` opens one, after an eos (training data separates
documents with eos): when special tokens are added (transformers' default: `tokenizer(text)`,
`pipeline("text-generation")`) the exported tokenizer puts the eos id first, so `model.generate`
continues the ids `andromeda generate` continues. `encode(text, add_special_tokens=False)` is ours.

The tokenizer needs no custom code, but transformers 5.x's AutoTokenizer loads config.json through
AutoConfig first, which asks "Do you wish to run the custom code?" for any model_type it does not
know (with no answer it goes on without). `trust_remote_code=False` skips the question and loads
the same tokenizer; so does `config=model.config`, which `load_transformers` passes.

Exporting and importing need only the core dependencies; using the folder needs transformers
(`pip install -e '.[hf]'` in the andromeda checkout).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..config import Config, check_size
from ..folders import (
    apply_umask,
    check_folder,
    check_output,
    member,
    read_json_object,
    replace_folder,
    staging_beside,
    writing,
)
from ..inference.quantize import quantization_of
from ..model import Transformer, build_transformer
from ..tokenizers import ByteTokenizer, HFTokenizer, Tokenizer
from ..weights import SafetensorsFile, placed, shape_problems, transformer_from_state

logger = logging.getLogger(__name__)

HF_EXTRA = "pip install -e '.[hf]' in the andromeda checkout (PyPI's andromeda is an unrelated project)"
MODEL_TYPE = "andromeda"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a checkpoint keeps its chat template under the same name
CODE_FILES = ("configuration_andromeda.py", "modeling_andromeda.py")
# Every file an export holds: a folder holding anything else is not replaced by a new export.
EXPORT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                          CHAT_TEMPLATE_FILE, *CODE_FILES})
# The byte tokenizer's special tokens (ids 256 and 257), as ByteTokenizer names them.
BYTE_SPECIALS = ("<|endoftext|>", "<|pad|>")
CODE_DIR = Path(__file__).parent / "hf_model"
AUTO_MAP = {
    "AutoConfig": "configuration_andromeda.AndromedaConfig",
    "AutoModel": "modeling_andromeda.AndromedaModel",
    "AutoModelForCausalLM": "modeling_andromeda.AndromedaForCausalLM",
}

# Renames of whole tensors, outside and inside the blocks (to_qkv and the QK scales are reshaped).
_TOP_NAMES = {
    "token_emb.weight": "model.embed_tokens.weight", "pos_emb.weight": "model.embed_positions.weight",
    "final_norm.weight": "model.norm.weight", "to_logits.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "attn.to_out.weight": "self_attn.o_proj.weight",
    "attn.q_scale": "self_attn.q_scale", "attn.k_scale": "self_attn.k_scale",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff.proj_in.weight": "mlp.up_proj.weight", "ff.proj_in.bias": "mlp.up_proj.bias",
    "ff.proj_out.weight": "mlp.down_proj.weight", "ff.proj_out.bias": "mlp.down_proj.bias",
}
_QKV = "attn.to_qkv.weight"
_PROJ = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")

# Config fields that change nothing the exported model computes: kept in config.json under
# `andromeda_extra` only so that an import rebuilds the identical Config.
_EXTRA_FIELDS = ("attn_flash", "qk_norm", "attn_qk_norm")


def require_transformers():
    """The `transformers` module, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"loading a Hugging Face folder needs the transformers package: {HF_EXTRA}") from err
    return transformers


# --------------------------------------------------------------------------- config


# HF name -> Config field, for the fields written and read back one to one.
_HF_FIELDS = {
    "vocab_size": "num_tokens", "hidden_size": "dim", "num_hidden_layers": "depth",
    "num_attention_heads": "heads", "num_key_value_heads": "attn_kv_heads", "head_dim": "dim_head",
    "max_position_embeddings": "max_seq_len", "layer_norm_eps": "norm_eps",
    "use_abs_pos_emb": "use_abs_pos_emb", "alibi": "alibi_pos_bias", "alibi_num_heads": "alibi_num_heads",
    "rotary_xpos": "rotary_xpos", "rotary_base": "rotary_base", "xpos_scale_base": "xpos_scale_base",
    "qk_norm_dim_scale": "attn_qk_norm_dim_scale", "qk_norm_fixed_scale": "qk_norm_fixed_scale",
}
_FLOAT_FIELDS = ("layer_norm_eps", "rotary_base", "xpos_scale_base", "qk_norm_fixed_scale")


def hf_config(config: Config, tokenizer: Tokenizer | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The config.json of an export: our Config in AndromedaConfig's names."""
    eos = tokenizer.eos_id if tokenizer is not None else None
    fields = {hf: getattr(config, ours) for hf, ours in _HF_FIELDS.items()}
    fields.update({hf: float(fields[hf]) for hf in _FLOAT_FIELDS})
    return {
        "architectures": ["AndromedaForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        **fields,
        "intermediate_size": config.ff_dim,
        "hidden_act": "gelu",
        "rotary_dim": config.rotary_dim,
        "qk_norm": config.use_qk_norm,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": False,
        # Our documents start after an eos, so it also serves as the start-of-text token.
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_id if tokenizer is not None else None,
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "andromeda_extra": {name: getattr(config, name) for name in _EXTRA_FIELDS},
    }


def config_from_hf(data: Mapping[str, Any], source: str | Path = CONFIG_FILE) -> Config:
    """Our Config from an exported config.json's contents; ValueError naming `source` otherwise."""
    model_type = data.get("model_type")
    if model_type != MODEL_TYPE:
        if model_type is None and "num_tokens" in data:
            raise ValueError(
                f"{source} is an Andromeda checkpoint's config, not a Hugging Face export: load the "
                f"folder with Andromeda.from_pretrained"
            )
        raise ValueError(
            f"{source}: model_type {model_type!r} (architectures {data.get('architectures')}) is not "
            f"an Andromeda model; expected model_type {MODEL_TYPE!r}, as written by export_hf"
        )
    required = [*_HF_FIELDS, "intermediate_size", "qk_norm"]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{source} lacks the Andromeda fields {missing}")
    fields = {ours: data[hf] for hf, ours in _HF_FIELDS.items()}
    hidden, inner = data["hidden_size"], data["intermediate_size"]
    if not (isinstance(hidden, int) and isinstance(inner, int) and hidden > 0 and inner % hidden == 0):
        raise ValueError(f"{source}: intermediate_size ({inner}) must be a multiple of hidden_size ({hidden})")
    fields["ff_mult"] = inner // hidden
    if data.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: hidden_act {data['hidden_act']!r} is not Andromeda's 'gelu'")
    head_dim = data["head_dim"]
    if data.get("rotary_xpos") and data.get("rotary_dim", head_dim // 2) != head_dim // 2:
        raise ValueError(
            f"{source}: rotary_dim {data['rotary_dim']} is not supported; Andromeda rotates "
            f"head_dim // 2 = {head_dim // 2} channels"
        )
    if data.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings is true; Andromeda's output projection is separate")
    extra = data.get("andromeda_extra") or {}
    qk_norm = bool(data["qk_norm"])
    # The two QK-norm spellings come back as they were, when they agree with the model.
    if bool(extra.get("qk_norm", False) or extra.get("attn_qk_norm", False)) == qk_norm and qk_norm:
        fields["qk_norm"], fields["attn_qk_norm"] = bool(extra.get("qk_norm")), bool(extra.get("attn_qk_norm"))
    else:
        fields["qk_norm"] = fields["attn_qk_norm"] = qk_norm
    if "attn_flash" in extra:
        fields["attn_flash"] = extra["attn_flash"]
    try:
        config = Config(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    check_size(config, source)
    return config


# --------------------------------------------------------------------------- weights


def to_hf_state_dict(state: Mapping[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Our Transformer state dict under the exported names (every tensor its own storage)."""
    H, K, D = config.heads, config.attn_kv_heads, config.dim_head
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if match is None or match.group(2) not in (*_BLOCK_NAMES, _QKV):
            raise KeyError(f"no Hugging Face name for the tensor {name!r}")
        prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
        if rest == _QKV:
            for proj, part in zip(_PROJ, tensor.split((H * D, K * D, K * D))):
                out[prefix + proj] = part.clone()  # safetensors refuses tensors sharing storage
        elif rest in ("attn.q_scale", "attn.k_scale"):
            out[prefix + _BLOCK_NAMES[rest]] = tensor.reshape(tensor.shape[0], D)
        else:
            out[prefix + _BLOCK_NAMES[rest]] = tensor
    return out


def from_hf_state_dict(tensors: Mapping[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Exported tensors back under our Transformer's names (the inverse of `to_hf_state_dict`)."""
    top = {hf: ours for ours, hf in _TOP_NAMES.items()}
    block = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
    D = config.dim_head
    state: dict[str, Tensor] = {}
    projections: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if name in top:
            state[top[name]] = tensor
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None or match.group(2) not in (*block, *_PROJ):
            raise KeyError(f"{name!r} is not an Andromeda weight")
        prefix, rest = f"blocks.{match.group(1)}.", match.group(2)
        if rest in _PROJ:
            projections.setdefault(prefix, {})[rest] = tensor
        elif rest in ("self_attn.q_scale", "self_attn.k_scale"):
            state[prefix + block[rest]] = tensor.reshape(tensor.shape[0], 1, D)
        else:
            state[prefix + block[rest]] = tensor
    for prefix, parts in projections.items():
        missing = [p for p in _PROJ if p not in parts]
        if missing:
            raise KeyError(f"layer {prefix[:-1]} lacks {missing}")
        state[prefix + _QKV] = torch.cat([parts[p] for p in _PROJ])
    return state


def _expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """The exported tensors' names and shapes for `config`, from a weightless (meta) model."""
    net = build_transformer(config, device="meta")
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(net.state_dict(), config).items()}


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names; FileNotFoundError naming what is absent."""
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        expected = 'a safetensors index, {"weight_map": {TENSOR: FILE}}'
        weight_map = read_json_object(index, expected).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} is not {expected}")
        # Each shard must be a file of this folder: a name like "../x" or "/dev/zero" is refused.
        files = [member(folder, name, what=f"{WEIGHTS_INDEX_FILE} weight file")
                 for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names weight files that are missing: {absent}")
        return files
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {others}: only safetensors weights are read)" if others else ""
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")


def read_hf_state_dict(hf_dir: str | Path, config: Config) -> dict[str, Tensor]:
    """The weights of an exported folder whose config is `config`, under our Transformer's names,
    after checking every name and shape (a ValueError naming the files and what differs)."""
    return from_hf_state_dict(_read_weights(_weight_files(Path(hf_dir)), config), config)


def _read_weights(files: list[Path], config: Config) -> dict[str, Tensor]:
    """Every tensor of `files`, after checking their names and shapes against `config`."""
    readers = [SafetensorsFile(file) for file in files]  # every header, before any tensor is read
    found = {name: shape for reader in readers for name, shape in reader.shapes().items()}
    where = {name: reader.path.name for reader in readers for name in reader.entries}
    problems = shape_problems(found, _expected_shapes(config), where)
    if problems:
        names = ", ".join(str(f) for f in files)
        raise ValueError(f"{names} does not match {files[0].parent / CONFIG_FILE}: {problems}")
    return {name: tensor for reader in readers for name, tensor in reader.mapped().items()}


# --------------------------------------------------------------------------- tokenizer


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (`ByteLevel`'s alphabet), indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def byte_tokenizer_json() -> str:
    """Our byte tokenizer as a `tokenizers` file: a byte-level BPE with no merges, so every byte
    is its own token with id = its value; <|endoftext|> = 256 and <|pad|> = 257 are special.
    Decoding joins the bytes and decodes them lossily (U+FFFD), as `ByteTokenizer.decode` does."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as TokenizersTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    byte = ByteTokenizer()
    vocab = {symbol: index for index, symbol in enumerate(_byte_symbols())}
    tokenizer = TokenizersTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in BYTE_SPECIALS])
    assert [tokenizer.token_to_id(token) for token in BYTE_SPECIALS] == [byte.eos_id, byte.pad_id]
    return tokenizer.to_str()


def _open_documents_with_eos(file: Path, eos_id: int) -> Any:
    """Make the tokenizer.json `file` put eos before a text (and a pair's second text) when special
    tokens are added, by transformers' own add_bos_token template; returns the post-processor it
    replaced (JSON), which never acted on our ids: we never add special tokens."""
    from tokenizers import Tokenizer as TokenizersTokenizer
    from tokenizers import processors

    replaced = read_json_object(file, "a tokenizers file (tokenizer.json)").get("post_processor")
    tokenizer = TokenizersTokenizer.from_file(str(file))
    eos = tokenizer.id_to_token(eos_id)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos}:0 $A:0", pair=f"{eos}:0 $A:0 {eos}:1 $B:1", special_tokens=[(eos, eos_id)])
    tokenizer.save(str(file))
    return replaced


def _write_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int, chat_template: str | None) -> None:
    """tokenizer.json and an AutoTokenizer tokenizer_config.json for `tokenizer` in `folder`."""
    from tokenizers import Tokenizer as TokenizersTokenizer

    file = folder / TOKENIZER_FILE
    if isinstance(tokenizer, ByteTokenizer):
        file.write_text(byte_tokenizer_json())
        _open_documents_with_eos(file, tokenizer.eos_id)
        identity: dict[str, Any] = {"type": "byte"}
    elif isinstance(tokenizer, HFTokenizer):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            shutil.copyfile(Path(tmp) / TOKENIZER_FILE, file)
        replaced = _open_documents_with_eos(file, tokenizer.eos_id)
        # Kept so that import_hf gives back the very tokenizer.json (and fingerprint) exported.
        identity = {"type": "huggingface", "name": tokenizer.name, "post_processor": replaced}
    else:
        raise TypeError(
            f"cannot export a tokenizer of type {type(tokenizer).__name__}: export_hf writes "
            f"ByteTokenizer and HFTokenizer (tokenizer.json) tokenizers"
        )
    loaded = TokenizersTokenizer.from_file(str(file))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": loaded.id_to_token(tokenizer.eos_id),
        "eos_token": loaded.id_to_token(tokenizer.eos_id),
        "pad_token": loaded.id_to_token(tokenizer.pad_id),
        "unk_token": None,
        # A document opens with eos, as `andromeda generate` opens a prompt (see the module doc).
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",  # batched generation continues each row at its end
        "andromeda_tokenizer": identity,
    }
    if isinstance(tokenizer, ByteTokenizer):
        # The byte tokenizer reads "<|endoftext|>" in text as its 13 bytes, never as the token.
        settings["split_special_tokens"] = True
    if chat_template is not None:
        settings["chat_template"] = chat_template
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def load_hf_tokenizer(hf_dir: str | Path) -> Tokenizer | None:
    """Our tokenizer from an exported folder; None if it has no tokenizer.json."""
    folder = Path(hf_dir)
    settings_file = folder / TOKENIZER_CONFIG_FILE
    settings = read_json_object(settings_file, "AutoTokenizer's settings") if settings_file.is_file() else {}
    identity = settings.get("andromeda_tokenizer") or {}
    if not isinstance(identity, dict):
        raise ValueError(f'{settings_file}: "andromeda_tokenizer" must be an object like {{"type": "byte"}}, '
                         f"got {identity!r}")
    if identity.get("type") == "byte":
        return ByteTokenizer()
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        return None
    name = identity.get("name") if isinstance(identity.get("name"), str) else None
    if "post_processor" not in identity:  # a tokenizer.json of another origin, taken as it is
        return HFTokenizer.from_file(file, name=name or folder.name)
    return _with_post_processor(file, identity["post_processor"], name or folder.name)


def _with_post_processor(file: Path, post_processor: Any, name: str) -> HFTokenizer:
    """The tokenizer of the tokenizer.json `file` with the post-processor export replaced put back."""
    from tokenizers import Tokenizer as TokenizersTokenizer

    data = read_json_object(file, "a tokenizers file (tokenizer.json)")
    data["post_processor"] = post_processor
    try:
        raw = TokenizersTokenizer.from_str(json.dumps(data))
    except Exception as err:  # the Rust side raises a bare Exception
        raise ValueError(f"{file} with the post_processor of {file.parent / TOKENIZER_CONFIG_FILE} is not a valid "
                         f"tokenizer: {err}") from None
    return HFTokenizer(raw, name)


# --------------------------------------------------------------------------- export / import


def _transformer(model: Any) -> Transformer:
    """The Transformer itself, or the one behind the seed's `Andromeda` face (`.Andromeda`)."""
    net = getattr(model, "Andromeda", model)
    if not isinstance(net, Transformer):
        raise TypeError(f"expected an Andromeda or a Transformer, got {type(model).__name__}")
    return net


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding an exported (model_type "andromeda") config.json."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        return read_json_object(file).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def is_export_folder(path: str | Path) -> bool:
    """Whether `path` holds an export and nothing else: the files `export_hf` writes."""
    path = Path(path)
    return is_hf_folder(path) and all(entry.name in EXPORT_FILES and entry.is_file() for entry in path.iterdir())


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path, *, dtype: torch.dtype | None = None,
              flag: str = "directory", chat_template: str | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a folder transformers loads with trust_remote_code=True;
    returns the folder.

    The weights keep their dtype unless `dtype` is given; a `chat_template` (its text) is written
    as chat_template.jinja and in tokenizer_config.json. The folder is written beside `out_dir` and renamed into place;
    an existing `out_dir` is replaced only if it is empty or an earlier export holding nothing but
    an export's files, never a run or an unrelated folder (a FileExistsError naming `flag`).
    """
    net = _transformer(model)
    config = net.config
    quantization = quantization_of(net)
    if quantization is not None:
        raise ValueError(f"the model is quantized ({quantization[0]}); the Hugging Face model holds full-precision "
                         f"weights: export the checkpoint it was quantized from")
    out_dir = check_output(out_dir, kind="Hugging Face export", accepts=is_export_folder, flag=flag)
    if tokenizer is not None and tokenizer.vocab_size > config.num_tokens:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.num_tokens}"
        )
    state = {name: t.detach().to("cpu", dtype if dtype is not None and t.is_floating_point() else t.dtype)
             for name, t in net.state_dict().items()}
    weights_dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    staging = staging_beside(out_dir)
    try:
        with writing(out_dir):
            _write_export(staging, config, state, tokenizer, weights_dtype, chat_template)
            apply_umask(staging)  # mkdtemp and safetensors make private files
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s", type(model).__name__, out_dir)
    return out_dir


def _write_export(folder: Path, config: Config, state: dict[str, Tensor], tokenizer: Tokenizer | None,
                  weights_dtype: torch.dtype, chat_template: str | None) -> None:
    tensors = {name: t.contiguous() for name, t in to_hf_state_dict(state, config).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    settings = hf_config(config, tokenizer, weights_dtype)
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    generation = {key: settings[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    generation["do_sample"] = False  # greedy, as `andromeda generate --temperature 0`, unless asked
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, folder / name)
    if tokenizer is not None:
        _write_tokenizer(tokenizer, folder, config.max_seq_len, chat_template)
    if chat_template is not None:
        (folder / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")


def import_hf(hf_dir: str | Path) -> tuple[Config, dict[str, Tensor], Tokenizer | None]:
    """Read an exported folder: (our Config, the Transformer state dict under our names, our
    tokenizer or None). Everything is validated first; any problem raises an error naming the
    file and what is wrong (another architecture, missing fields, missing or mis-shaped tensors).
    """
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {folder} does not exist")
    check_folder(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}")
    data = read_json_object(config_file, "an exported AndromedaConfig, a JSON object")
    config = config_from_hf(data, config_file)
    state = read_hf_state_dict(folder, config)
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer is not None and tokenizer.vocab_size > config.num_tokens:
        raise ValueError(f"{folder / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but {config_file} a "
                         f"vocab_size of {config.num_tokens}")
    return config, state, tokenizer


def load_hf(
    hf_dir: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """The Transformer of an exported folder (see `import_hf`), in eval mode. Floating-point
    weights keep their saved dtype unless `dtype` is given. (Commands load every kind of folder
    through `checkpoint.load_transformer`, which reads an export with `read_hf_state_dict`.)"""
    config, state, _ = import_hf(hf_dir)
    return transformer_from_state(config, {name: placed(t, device, dtype) for name, t in state.items()})


def load_transformers(hf_dir: str | Path, **kwargs: Any):
    """(model, tokenizer) of an exported folder through transformers' Auto classes, as any user
    of the folder would load them; `kwargs` go to `from_pretrained` (e.g. dtype, device_map)."""
    transformers = require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, **kwargs)
    tokenizer = None
    if (Path(hf_dir) / TOKENIZER_FILE).is_file():
        # With the config given, AutoTokenizer does not load config.json (and ask about its code).
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir), config=model.config)
    return model.eval(), tokenizer


__all__ = [
    "HF_EXTRA", "byte_tokenizer_json", "config_from_hf", "export_hf", "from_hf_state_dict", "hf_config",
    "import_hf", "is_hf_folder", "load_hf", "load_hf_tokenizer", "load_transformers", "read_hf_state_dict",
    "require_transformers", "to_hf_state_dict",
]

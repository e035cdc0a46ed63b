"""Checkpoints: the folders models are saved in, and the one way any model folder is opened and loaded.

    source = open_model_source("runs/demo")        # run folder, checkpoint, quantized checkpoint or HF export
    net = load_for_inference(source, device=device, dtype="bf16")    # or load_transformer(source, ...)
    tokenizer = load_checkpoint_tokenizer(source)
    save_pretrained(net, "out/", tokenizer)

- `files`: a checkpoint folder's files, writing one whole (its manifest of sizes and SHA-256s,
  permissions, fsyncs) and its config.json;
- `runs`: a training run's checkpoints (`RUN/checkpoints/step_*`, `RUN/latest`), each renamed into
  place only once complete, so a crash at any moment leaves every earlier one whole;
- `source`: `open_model_source`, the one place a path is resolved (a run folder to its latest
  checkpoint) and its config parsed, into a `ModelSource` every command passes on;
- `loader`: the one loader of every kind of folder, and the dtype policy of inference;
- `lora`: LoRA adapter folders (peft's files under the exported model's names), checked against
  their base and merged into its weights as they load (`attach_lora`).

Loading validates everything (files present, manifest, header intact, every name and shape
matching the config) before a model is built, so a bad folder raises an error naming the file and
the problem and never yields a half-loaded model.
"""

from ..folders import CheckpointError, UnsafeFileError
from .files import (
    CONFIG_FILE,
    MANIFEST_FILE,
    OPTIMIZER_DIR,
    QUANTIZATION_KEY,
    TRAIN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
    check_checkpoint_output,
    describe_quantization,
    finish_checkpoint_folder,
    is_checkpoint_folder,
    read_checkpoint_config,
    save_pretrained,
    verify_checkpoint,
    write_checkpoint_files,
    write_manifest,
)
from .loader import (
    DTYPES,
    check_load_request,
    inference_dtype,
    load_checkpoint_tokenizer,
    load_for_inference,
    load_transformer,
    torch_dtype,
    verify_model_files,
)
from .lora import (
    ADAPTER_BASE_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS_FILE,
    LORA_MODULES,
    LoraAdapter,
    attach_lora,
    from_hf_adapter_state,
    hf_target_modules,
    open_adapter,
    read_adapter,
    write_adapter,
)
from .runs import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    checkpoint_folder,
    commit_checkpoint,
    latest_checkpoint,
    remove_incomplete,
    stage_checkpoint,
    staging_folder,
    step_checkpoints,
)
from .source import (
    CHECKPOINT,
    HF_EXPORT,
    QUANTIZED,
    ModelSource,
    load_config,
    load_quantization,
    load_train_config,
    open_draft_source,
    open_model_source,
    tokenizer_digest,
    refuse_quantized,
    resolve_checkpoint,
)

__all__ = [
    "ADAPTER_BASE_FILE", "ADAPTER_CONFIG_FILE", "ADAPTER_FILES", "ADAPTER_WEIGHTS_FILE", "LORA_MODULES", "LoraAdapter",
    "attach_lora", "from_hf_adapter_state", "hf_target_modules", "open_adapter", "read_adapter", "write_adapter",
    "CHECKPOINT", "CHECKPOINTS_DIR", "CONFIG_FILE", "CheckpointError", "DTYPES", "HF_EXPORT", "LATEST_FILE",
    "MANIFEST_FILE", "ModelSource", "OPTIMIZER_DIR", "QUANTIZATION_KEY", "QUANTIZED", "TRAINER_STATE_FILE",
    "TRAIN_CONFIG_FILE", "UnsafeFileError", "WEIGHTS_FILE", "check_checkpoint_output", "check_load_request",
    "checkpoint_folder", "commit_checkpoint", "describe_quantization", "finish_checkpoint_folder", "inference_dtype",
    "is_checkpoint_folder", "latest_checkpoint", "load_checkpoint_tokenizer", "load_config", "load_for_inference",
    "load_quantization", "load_train_config", "load_transformer", "open_model_source", "read_checkpoint_config",
    "refuse_quantized", "remove_incomplete", "resolve_checkpoint", "save_pretrained", "stage_checkpoint",
    "staging_folder", "step_checkpoints", "torch_dtype", "verify_checkpoint", "verify_model_files",
    "write_checkpoint_files", "write_manifest",
]

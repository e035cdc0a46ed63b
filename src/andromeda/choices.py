"""The names and defaults the library's options take, without PyTorch: the command line lists them
in `--help` before PyTorch loads (`andromeda --help` answers in a fraction of a second).

Each is defined here once; the module that acts on it imports it from here (the dtype table of
`checkpoint.loader`, the quantization schemes of `inference.quantize`, the parallel modes of
`parallel.parallelize`, the GPU figures of `plan`).
"""

from __future__ import annotations

# The --dtype names, and the torch dtype (an attribute of torch) each stands for.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}

# Weight-only quantization (inference.quantize).
SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the block sizes ATen's int4 kernels are built for
DEFAULT_GROUP_SIZE = 128

# How the processes torchrun starts share a training run (parallel.parallelize).
PARALLEL_MODES = ("none", "ddp", "fsdp")
DEFAULT_TIMEOUT_S = 600.0  # how long a collective waits for the other processes by default

# The GPU `andromeda plan` prices a run on, unless told another.
H100_GIB = 80.0
H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak
GIB = 2**30

# Speculative decoding (inference.speculative): tokens proposed per step at most; more can hardly
# be accepted, and the verify step stops being cheap.
MAX_SPECULATIVE_TOKENS = 32

# What a KV cache stores keys and values in (model.cache): auto, the compute dtype; int8 with a
# scale per token and key/value head.
KV_CACHE_DTYPES = ("auto", "int8")

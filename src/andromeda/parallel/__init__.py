"""Training on several processes, applied from outside the model (as torchtitan does).

    environment.py  the process group torchrun describes, and the few collectives the trainer
                    uses to agree (clock, stop flag, objects)
    parallelize.py  DDP or FSDP2 over a Transformer, activation checkpointing, gradient clipping
                    over shards, the consolidated state dict
    dcp.py          the optimizer state, sharded with torch.distributed.checkpoint

torchrun is the launcher; it starts one process per device and sets RANK, LOCAL_RANK and
WORLD_SIZE:

    torchrun --standalone --nproc_per_node 2 -m andromeda train --parallel ddp ...

Each process takes a contiguous block of every step's global batch (`data.sample_batch`, a
function of (seed, step) only) and splits its block further into the gradient-accumulation
micro-batches. Every micro-batch has the same number of target tokens, so the mean of the
per-micro-batch mean losses is the mean over all tokens of the global batch: each process
backpropagates `loss / grad_accum`, and DDP's all-reduce and FSDP's reduce-scatter *average* the
gradients over the W processes, giving d(global token mean)/dθ exactly as one process would
compute it, up to the order of floating-point sums. The loss curve therefore does not depend on
the number of processes.
"""

from .environment import DistEnv, distributed, launched_rank
from .parallelize import PARALLEL_MODES, build_parallel_model, check_parallel_setup, parallelize

__all__ = ["DistEnv", "PARALLEL_MODES", "build_parallel_model", "check_parallel_setup", "distributed",
           "launched_rank", "parallelize"]

#!/usr/bin/env bash
# The GPU check: what no CPU can check, in one run of under 10 minutes on one H100/H200, ending in
# one table. Run it from the repository root the first time a GPU is at hand:
#
#     bash benchmarks/gpu_check.sh            # writes its logs to ${OUT:-/tmp/gpu_check}
#
# It uses the machine's own python3 with PyTorch (or $PYTHON) and this checkout's src/ (nothing is
# installed; x-transformers parity tests are skipped where it is missing). Steps:
#   1. the device-parametrised tests on cpu and cuda (model parity, cached decoding, the slot cache,
#      the compiled decode step under CUDA graphs, QK-norm's dtype under CUDA autocast)
#   2. with 2+ GPUs: a 2-process FSDP bf16 smoke run over NCCL, resumed once
#   3. training throughput of the default model, bf16, 8192 tokens: MFU against the datasheet peak
#      (989 TFLOP/s dense bf16 for H100/H200)
#   4. cached decoding of the default model in bf16: tokens/s against the HBM bandwidth bound
#
# Exit codes: 0 the checks ran (the table says how each went); 77 no CUDA device or no PyTorch, so
# nothing was checked (one line says which; 77 is automake's and meson's "skipped").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
declare -A status

# One line, no traceback, when there is nothing to check: the reason goes to device.err.
if ! "$PY" - >"$OUT/device.txt" 2>"$OUT/device.err" <<'PYTHON'
import sys
try:
    import torch
except ImportError as error:
    sys.exit(f"{sys.executable} cannot import PyTorch ({error}); set PYTHON to one that can")
if not torch.cuda.is_available():
    sys.exit(f"PyTorch {torch.__version__} sees no CUDA device")
print(torch.__version__, torch.cuda.get_device_name())
PYTHON
then
    echo "no GPU: nothing to check ($(tail -n 1 "$OUT/device.err"))"
    exit 77
fi
cat "$OUT/device.txt"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")

echo "== 1. tests on cpu and cuda"
ANDROMEDA_TEST_DEVICES=cpu,cuda timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_model.py tests/test_cache.py tests/test_generation.py -k "x_transformers or admitted or cached_greedy or compiled or qk_norm" \
    2>&1 | tee "$OUT/tests.txt"
status[tests]=$(tail -1 "$OUT/tests.txt")

if [ "$gpus" -ge 2 ]; then
    echo "== 2. 2-process FSDP smoke"
    run="$OUT/fsdp_run"
    rm -rf "$run"
    common=(--preset tiny --parallel fsdp --bf16 --batch-size 8 --seq-len 128 --save-every 10 --eval-batches 1
            --no-progress --out "$run")
    timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m andromeda train "${common[@]}" \
        --max-steps 10 >"$OUT/fsdp.txt" 2>&1 \
      && timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m andromeda train \
        --out "$run" --resume --max-steps 20 --no-progress >>"$OUT/fsdp.txt" 2>&1
    status[fsdp]=$([ $? -eq 0 ] && echo "ok: 10 steps, resumed to 20" || echo "FAILED (see fsdp.txt)")
else
    status[fsdp]="skipped: one GPU"
fi

echo "== 3. training throughput, default model"
timeout 240 "$PY" benchmarks/bench_train.py --device cuda --config default --seq-len 8192 --batch 1 --no-peer \
    --steps 3 --warmup 1 --modes bf16 2>&1 | tee "$OUT/train.txt"
status[train]=$(grep -E "^\| bf16 \| andromeda" "$OUT/train.txt" | head -1 | awk -F'|' '{print $6 " tok/s, MFU" $7}')

echo "== 4. cached decoding, default model"
timeout 180 "$PY" benchmarks/bench_decode.py --device cuda --big --schemes bf16,int8 --prefill-len 1024 2>&1 \
    | tee "$OUT/decode.txt"
status[decode]=$(grep -E "^\| bf16 \|" "$OUT/decode.txt" | head -1 | awk -F'|' '{print $3 " tok/s (" $7 " of the bound)"}')

echo
echo "| check | result |"
echo "|---|---|"
echo "| device | $(cat "$OUT/device.txt") |"
for key in tests fsdp train decode; do
    echo "| $key | ${status[$key]:-no result} |"
done | tee "$OUT/summary.md"

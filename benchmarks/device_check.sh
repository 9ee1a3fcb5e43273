#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU tests, `hypir doctor`, and `hypir bench` with the
# attention-kernel profile at 1024 and 512 output. Results go to $OUT (or ./device_out).
# Run from the repository root on a CUDA machine:  bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
if ls .wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m hypir doctor 2>&1 | tee "$OUT/doctor.txt"
python3 -m pytest tests/test_gpu.py tests/test_gpu_kernels.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.txt" | tail -60
python3 -m hypir bench --model sd21 --size 1024 --profile --json "$OUT/bench_1024.json" 2>&1 | tee "$OUT/bench_1024.txt" | grep -v "^\[HYPIR\]"
python3 -m hypir bench --model sd21 --size 512 --json "$OUT/bench_512.json" 2>&1 | tee "$OUT/bench_512.txt" | grep -v "^\[HYPIR\]"

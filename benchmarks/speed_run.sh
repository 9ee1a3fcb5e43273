#!/usr/bin/env bash
# The speed issue's numbers on one warm CUDA machine, from the repository root. Results go to $OUT.
#
#   bash benchmarks/speed_run.sh main        # GPU tests, `hypir bench --speed` at 1024 and 2048 (eager, CUDA
#                                            # graphs, torch.compile with a cold cache), the 4096 run under 8 GiB
#   bash benchmarks/speed_run.sh reference   # the reference implementation at its defaults, and the compiled
#                                            # mode's first call again in a new process (warm compile cache)
#
# Needs: diffusers (a wheel in .wheels/ is installed if present); for `reference`, the reference's HYPIR/
# package extracted into .reference/ (git archive of XPixelGroup/HYPIR, never committed) and peft.
# With flash-attn-4 installed by benchmarks/install_wheels.sh, /tmp/hypir_env.sh puts it on the path.
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
part=${1:-main}
for wheel in .wheels/diffusers-*.whl; do
  [ -e "$wheel" ] && python3 -m pip install -q --no-deps --no-index "$wheel" 2>&1 | grep -v WARNING | tail -2
done
[ -f /tmp/hypir_env.sh ] && source /tmp/hypir_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/hypir_inductor_cache

if [ "$part" = main ]; then
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"  # the first compile is timed cold
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  python3 -m hypir doctor > "$OUT/doctor.txt" 2>&1
  python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py > "$OUT/test_gpu.txt" 2>&1
  tail -3 "$OUT/test_gpu.txt"
  python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs,compiled --budget-size 4096 \
    --budget-gb 8 --repeats 10 --json "$OUT/speed.json" 2>&1 | grep -v "^\[HYPIR\]" | tee "$OUT/speed.txt"
else
  commit=$(cat .reference/COMMIT 2>/dev/null || echo unknown)
  python3 benchmarks/reference_baseline.py --reference .reference --reference-commit "$commit" --input 512 \
    --repeats 5 --base-dir /tmp/refbase_sd21 --json "$OUT/reference_512.json" 2>&1 | tail -4
  python3 benchmarks/reference_baseline.py --reference .reference --reference-commit "$commit" --input 1024 \
    --repeats 2 --base-dir /tmp/refbase_sd21 --json "$OUT/reference_1024.json" 2>&1 | tail -4
  # The compiled mode in a new process: the compile cache the main part filled makes its first call short.
  python3 -m hypir bench --speed --sizes 1024 --modes compiled --baselines "" --budget-size 0 --repeats 10 \
    --json "$OUT/speed_compiled_warm_cache.json" 2>&1 | grep -v "^\[HYPIR\]" | tee "$OUT/speed_compiled_warm_cache.txt"
fi

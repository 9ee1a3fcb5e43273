#!/usr/bin/env bash
# The speed issue's numbers on a warm CUDA machine, from the repository root; results in $OUT.
#
#   bash benchmarks/speed_run.sh [seconds]                 # stays within this many seconds (default 560)
#   PART=startup bash benchmarks/speed_run.sh [seconds]    # the second part, in a call of its own (4-5)
#
#   PART=speed (the default):
#           1. the GPU tests of the fused kernels (GroupNorm, bias, the fused softmax), CUDA graphs and
#              the out-of-memory retry;
#           2. `hypir bench --speed` at 1024 and 2048 output: diffusers' stock modules (standard and SDPA
#              attention) against the eager, default (CUDA graph) and pytorch-softmax modes, PSNR against
#              float32, a 4096 output under an 8 GiB budget, the attention kernels and the GPU time by kind;
#           3. the reference implementation (XPixelGroup/HYPIR, extracted into .reference/, never committed)
#              at its defaults on the same random weights, 512 -> 1024;
#   PART=startup:
#           4. the first image of a process and of a new size (benchmarks/first_image.py), twice on fresh Triton
#              and attention-timing caches: the first run compiles and times, the second finds both on disk;
#           5. a 4096 output under an 8 GiB budget in each tile size beside the planner's choice and estimate
#              (benchmarks/tile_sizes.py).
# (The torch.compile mode was measured here until it was removed: benchmarks/results/2026-11-25-h100-speed/.)
# Needs diffusers (a wheel in .wheels/ is installed if present) and, for 3, peft.
# If /tmp/hypir_env.sh exists on the device (an earlier call of the same session that installed carried wheels
# such as flash-attn-4 wrote it), it is sourced first.
set -uo pipefail
OUT=${OUT:-device_out}
LIMIT=${1:-560}
PART=${PART:-speed}
case $PART in speed|startup) ;; *) echo "PART is speed or startup (got $PART)"; exit 2 ;; esac
case $LIMIT in ''|*[!0-9]*) echo "the argument is the seconds the run may take (got $LIMIT; the eager/compiled parts are gone)"; exit 2 ;; esac
mkdir -p "$OUT"
for wheel in .wheels/diffusers-*.whl; do
  [ -e "$wheel" ] && python3 -m pip install -q --no-deps --no-index "$wheel" 2>&1 | grep -v WARNING | tail -2
done
[ -f /tmp/hypir_env.sh ] && source /tmp/hypir_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
left() { echo $((LIMIT - SECONDS)); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/doctor.txt"
python3 -m hypir doctor >> "$OUT/doctor.txt" 2>&1
head -2 "$OUT/doctor.txt"
if [ "$PART" = startup ]; then
  caches=$(mktemp -d)
  for run in 1 2; do  # 1: Triton compiles and every shape is timed; 2: both read from the caches of run 1
    TRITON_CACHE_DIR=$caches/triton HYPIR_CACHE_DIR=$caches/hypir timeout 150 python3 benchmarks/first_image.py \
      --json "$OUT/first_image_$run.json" > "$OUT/first_image_$run.txt" 2>&1
    grep output "$OUT/first_image_$run.txt" | cut -c1-200
  done
  TRITON_CACHE_DIR=$caches/triton timeout $(( $(left) > 200 ? 180 : $(left) - 20 )) python3 benchmarks/tile_sizes.py \
    --json "$OUT/tile_sizes.json" > "$OUT/tile_sizes.txt" 2>&1
  grep asked "$OUT/tile_sizes.txt" | cut -c1-200
  echo "done at $SECONDS s"
  exit 0
fi
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0: the numbers only, where the same call already ran the GPU tests
  timeout 170 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py \
    -k "gpu_kernels or out_of_memory" > "$OUT/test_gpu.txt" 2>&1
  tail -2 "$OUT/test_gpu.txt"
fi
timeout 280 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs,pytorch-softmax --budget-size 4096 \
  --budget-gb 8 --repeats 10 --json "$OUT/speed.json" 2>&1 | grep -v "^\[HYPIR\]" | tee "$OUT/speed.txt"
commit=$(cat .reference/COMMIT 2>/dev/null || echo unknown)
timeout $(( $(left) > 150 ? 130 : $(left) - 20 )) python3 benchmarks/reference_baseline.py --reference .reference \
  --reference-commit "$commit" --input 512 --repeats 3 --base-dir /tmp/refbase_sd21 \
  --json "$OUT/reference_512.json" > "$OUT/reference_512.txt" 2>&1
tail -3 "$OUT/reference_512.txt"
echo "done at $SECONDS s"

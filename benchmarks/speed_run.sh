#!/usr/bin/env bash
# The speed issue's numbers on a warm CUDA machine, from the repository root; results in $OUT.
#
#   bash benchmarks/speed_run.sh [part] [seconds]   # part: all (default), eager or compiled; seconds: the part
#                                                    # stays within this many (default 560)
#
# eager:    1. the GPU tests of the fused kernels (GroupNorm, bias, the fused softmax), CUDA graphs and
#              the out-of-memory retry;
#           2. `hypir bench --speed` at 1024 and 2048 output: diffusers' stock modules (standard and SDPA
#              attention) against the eager, default (CUDA graph) and pytorch-softmax modes, PSNR against
#              float32, a 4096 output under an 8 GiB budget, the attention kernels and the GPU time by kind;
#           3. the reference implementation (XPixelGroup/HYPIR, extracted into .reference/, never committed)
#              at its defaults on the same random weights, 512 -> 1024;
# compiled: 4. the torch.compile mode at 1024 and 2048 with a cold compile cache (first call reported).
# On a device whose calls stop at 600 s, run the two parts as two consecutive calls.
# Needs diffusers (a wheel in .wheels/ is installed if present) and, for 3, peft.
# If /tmp/hypir_env.sh exists on the device (an earlier call of the same session that installed carried wheels
# such as flash-attn-4 wrote it), it is sourced first.
set -uo pipefail
OUT=${OUT:-device_out}
PART=${1:-all}
LIMIT=${2:-560}
case $PART in all|eager|compiled) ;; *) echo "part: all, eager or compiled (got $PART)"; exit 2 ;; esac
mkdir -p "$OUT"
for wheel in .wheels/diffusers-*.whl; do
  [ -e "$wheel" ] && python3 -m pip install -q --no-deps --no-index "$wheel" 2>&1 | grep -v WARNING | tail -2
done
[ -f /tmp/hypir_env.sh ] && source /tmp/hypir_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/hypir_inductor_cache
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
left() { echo $((LIMIT - SECONDS)); }

if [ "$PART" != compiled ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/doctor.txt"
  python3 -m hypir doctor >> "$OUT/doctor.txt" 2>&1
  head -2 "$OUT/doctor.txt"
  timeout 170 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py \
    -k "gpu_kernels or out_of_memory" > "$OUT/test_gpu.txt" 2>&1
  tail -2 "$OUT/test_gpu.txt"
  timeout 280 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs,pytorch-softmax --budget-size 4096 \
    --budget-gb 8 --repeats 10 --json "$OUT/speed.json" 2>&1 | grep -v "^\[HYPIR\]" | tee "$OUT/speed.txt"
  commit=$(cat .reference/COMMIT 2>/dev/null || echo unknown)
  timeout $(( $(left) > 150 ? 130 : $(left) - 20 )) python3 benchmarks/reference_baseline.py --reference .reference \
    --reference-commit "$commit" --input 512 --repeats 3 --base-dir /tmp/refbase_sd21 \
    --json "$OUT/reference_512.json" > "$OUT/reference_512.txt" 2>&1
  tail -3 "$OUT/reference_512.txt"
fi
[ "$PART" = eager ] && { echo "done at $SECONDS s"; exit 0; }
echo "compiled: $(left) s left"
timeout $(( $(left) - 5 )) python3 -m hypir bench --speed --sizes 1024,2048 --modes compiled --baselines "" \
  --budget-size 0 --repeats 10 --json "$OUT/speed_compiled.json" 2>&1 | grep -v "^\[HYPIR\]" | tee "$OUT/speed_compiled.txt"
echo "done at $SECONDS s"

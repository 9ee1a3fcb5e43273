#!/usr/bin/env bash
# The FlashAttention packages for real on one GPU machine (issue: FlashAttention packages, point 5): flash-attn 2
# built there, flash-attn-4 carried in parts, both in one folder as pip would install them (`flash_attn/` from
# flash-attn 2, `flash_attn/cute/` from flash-attn-4), then the GPU tests and the per-backend table.
# Four consecutive calls on one warm machine, from the repository root; results in $OUT:
#
#   call a: bash benchmarks/flash_device_run.sh a   (carry .fa2 .fa4a .wheels)  build flash-attn 2 (~5 min)
#   call b: bash benchmarks/flash_device_run.sh b   (carry .fa4b)               the cu13 libraries, part 2
#   call c: bash benchmarks/flash_device_run.sh c   (carry .fa4c)               part 3, install flash-attn-4, GPU tests
#   call d: bash benchmarks/flash_device_run.sh d   (nothing)                   the table
#
# Here, once: .fa2 holds flash-attn's sdist and the workplace's build script; .fa4a the flash-attn-4 wheels
# (flash-attn-4, nvidia-cutlass-dsl and its libs, apache-tvm-ffi, torch-c-dlpack-ext, quack-kernels) and
# cu13.part00; .fa4b and .fa4c cu13.part01 and .part02 (the 92 MB cu13 libraries wheel, split with `split -b`).
#
# The table (call d): `hypir bench --profile` at 1024 and 2048 (every usable backend forced for the whole pass,
# the kernels each ran, from the profiler) and `hypir bench --speed` (diffusers' stock modules, standard and SDPA,
# against auto), all with both packages present.
set -uo pipefail
PART=${1:?a, b, c or d}
OUT=${OUT:-device_out}
SITE=/tmp/fa2site
mkdir -p "$OUT" /tmp/fa4
env_file=/tmp/hypir_env.sh  # sourced by later calls (and by benchmarks/speed_run.sh)
case $PART in
a)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARNING | tail -2
  cp .fa4a/* /tmp/fa4/
  (time bash .fa2/build_flash_attn2_on_device.sh .fa2 "$SITE") > "$OUT/fa2_build.txt" 2>&1
  tail -3 "$OUT/fa2_build.txt"
  echo "export PYTHONPATH=$SITE:/tmp/site:$PWD HF_HUB_OFFLINE=1" > $env_file
  ;;
b) cp .fa4b/* /tmp/fa4/ && ls /tmp/fa4 ;;
c)
  cp .fa4c/* /tmp/fa4/
  cat /tmp/fa4/cu13.part* > /tmp/fa4/cu13.zip
  for wheel in /tmp/fa4/*.whl /tmp/fa4/cu13.zip; do python3 -m zipfile -e "$wheel" "$SITE"; done  # merged, as pip would
  dsl=$SITE/nvidia_cutlass_dsl
  echo "export PYTHONPATH=$SITE:$dsl/python_packages:$dsl/dsl_packages:/tmp/site:$PWD HF_HUB_OFFLINE=1" > $env_file
  source $env_file
  python3 -m hypir doctor > "$OUT/doctor.txt" 2>&1; grep -E "flash_attn|FlashAttention" "$OUT/doctor.txt" | head -8
  timeout 420 python3 -m pytest tests/test_gpu.py tests/test_gpu_kernels.py -q -s -p no:cacheprovider \
    > "$OUT/test_gpu.txt" 2>&1
  tail -1 "$OUT/test_gpu.txt"; grep -E "^(FAILED|ERROR)" "$OUT/test_gpu.txt" | head -10
  ;;
d)
  source $env_file
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
  for size in 1024 2048; do
    timeout 200 python3 -m hypir bench --model sd21 --size $size --profile --repeats 5 --json "$OUT/backends_$size.json" \
      2>&1 | grep -v "^\[HYPIR\]" > "$OUT/backends_$size.txt"
    head -20 "$OUT/backends_$size.txt"
  done
  timeout $(( 590 - SECONDS )) python3 -m hypir bench --speed --sizes 1024,2048 --modes eager+graphs \
    --baselines standard,sdpa --budget-size 0 --repeats 10 --json "$OUT/speed.json" 2>&1 | grep -v "^\[HYPIR\]" \
    > "$OUT/speed.txt"
  tail -8 "$OUT/speed.txt"
  ;;
*) echo "part: a, b, c or d (got $PART)"; exit 2 ;;
esac
echo "done at $SECONDS s"

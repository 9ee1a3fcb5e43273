#!/usr/bin/env bash
# ComfyUI on the GPU machine: the end-to-end test module on the GPU (tiny and full-size random weights) and
# benchmarks/comfyui_gpu_check.py, against the 2024 tree (the one CI uses) and the current ComfyUI.
# Their wheels do not fit one call, so it runs as two consecutive calls while the machine is warm:
#
#   here, once:  bash benchmarks/comfyui_device_run.sh prepare CURRENT_COMFYUI_TREE [COMMIT]
#   call 1:      COMMIT=abc1234 bash benchmarks/comfyui_device_run.sh engine    (carry .comfy-small .wheels)
#   call 2:      COMMIT=abc1234 bash benchmarks/comfyui_device_run.sh current   (carry .comfy-av .comfy-current)
#   call 3:      COMMIT=abc1234 LIMIT=500 bash benchmarks/comfyui_device_run.sh cards   (nothing to carry)
#   call 4:      COMMIT=abc1234 bash benchmarks/comfyui_device_run.sh 2024      (carry .comfy-small)
#
# Every call installs the wheels it carries into /tmp/site, which stays while the machine is warm (all of
# them together pass the 64 MiB a call carries). `engine` runs the engine's GPU checks that ComfyUI's
# settings touch; the cards (8/12/24 GiB x normal/--lowvram on the current ComfyUI) have a call of their own.
#
# prepare: downloads the wheels the GPU machine lacks (ComfyUI's requirements beyond its image: torchsde,
# kornia, spandrel, pydantic, alembic, SQLAlchemy; av and the frontend package for the current ComfyUI) and packs
# both trees (the 2024 tree from $HYPIR_COMFYUI_DIR or .cache/comfyui, unpacked by .ci/run). The folders are
# git-ignored through .git/info/exclude. Results in $OUT.
set -uo pipefail
PART=${1:?prepare, engine, current, cards or 2024}
OUT=${OUT:-device_out}
COMMIT_FILE=.comfy-small/COMMIT

download() {  # download FOLDER SPEC...
  local folder=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$folder" "$@"
}

case $PART in
prepare)
  CURRENT=${2:?the current ComfyUI tree (a checkout of Comfy-Org/ComfyUI)}
  TREE_2024=${HYPIR_COMFYUI_DIR:-.cache/comfyui}
  mkdir -p .comfy-small .comfy-av .comfy-current
  for folder in .comfy-small .comfy-av .comfy-current; do
    grep -qx "/$folder/" .git/info/exclude || echo "/$folder/" >> .git/info/exclude
  done
  download .comfy-small torchsde==0.2.6 trampoline==0.1.2 kornia==0.9.0 kornia_rs==0.2.0 spandrel==0.4.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 \
    annotated-types==0.8.0 alembic==1.20.1 Mako==1.3.10 SQLAlchemy==2.1.9
  download .comfy-av av==19.0.2 comfyui-frontend-package==1.27.10
  tar -czf .comfy-small/comfyui-2024.tar.gz -C "$TREE_2024" .
  tar -czf .comfy-current/comfyui-current.tar.gz -C "$CURRENT" .
  echo "${3:-$(git rev-parse --short HEAD)}" > $COMMIT_FILE
  du -sh .comfy-small .comfy-av .comfy-current
  exit 0 ;;
engine|2024|current|cards) ;;
*) echo "part: prepare, engine, 2024, current or cards (got $PART)"; exit 2 ;;
esac

mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
COMMIT=${COMMIT:-$(cat $COMMIT_FILE 2>/dev/null || echo unknown)}  # the device's git log is not this checkout's
shopt -s nullglob
wheels=(.wheels/*.whl .comfy-small/*.whl .comfy-av/*.whl)
[ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  "${wheels[@]}" 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
failures() { grep -E "^(E  |FAILED|ERROR)" "$1" | head -${2:-12}; }
LIMIT=${LIMIT:-590}
left() { local s=$(( LIMIT - 5 - SECONDS )); echo $(( s > 1 ? s : 1 )); }  # timeout 0 would mean no limit
pack() {  # at most 8 files come back from a call: all but the summary $1 go into one archive
  # written beside $OUT first: tar reading the folder it writes into stops with "file changed as we read it"
  tar -czf "/tmp/run_$PART.tar.gz" -C "$OUT" --exclude "$1" . \
    && find "$OUT" -type f ! -name "$1" -delete && mv "/tmp/run_$PART.tar.gz" "$OUT/"
}

if [ "$PART" = engine ]; then  # weights moved under CUDA graphs, cudaMallocAsync (ComfyUI's allocator) with
  # the Triton kernels, fp16 forced with a real overflow, and what cudaMallocAsync costs the pass
  timeout $(( $(left) > 150 ? 150 : $(left) )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "malloc or moved or second_gpu" > "$OUT/engine_tests.txt" 2>&1
  tail -1 "$OUT/engine_tests.txt"; failures "$OUT/engine_tests.txt" 20
  for part in fp16 allocator; do
    [ $(left) -gt 30 ] || break
    timeout $(left) python3 benchmarks/cards_check.py $part --json "$OUT/cards_$part.json" > "$OUT/cards_$part.txt" 2>&1
    grep '^{' "$OUT/cards_$part.txt" | cut -c1-400
  done
  echo "done at $SECONDS s"
  exit 0
fi
if [ "$PART" = cards ]; then  # what the call `current` unpacked is still there while the machine is warm
  [ -d /tmp/site ] && [ -f /tmp/comfyui-current/main.py ] || { echo "cards: run part current first (same warm machine)"; exit 2; }
  export HYPIR_COMFYUI_DIR=/tmp/comfyui-current HYPIR_COMFY_PYTHON=python3 HYPIR_COMFY_GPU=1
  timeout $(left) python3 benchmarks/comfyui_gpu_check.py --comfyui /tmp/comfyui-current --python python3 \
    --parts cards --json "$OUT/comfyui_cards.json" --logs "$OUT/comfyui_cards_logs.txt" --commit "$COMMIT" \
    2>&1 | tee "$OUT/comfyui_cards.txt"
  echo "done at $SECONDS s"
  gzip -f "$OUT/comfyui_cards_logs.txt"
  exit 0
fi
TREE=/tmp/comfyui-$PART
rm -rf "$TREE" && mkdir -p "$TREE"
if [ "$PART" = 2024 ]; then tar -xzf .comfy-small/comfyui-2024.tar.gz -C "$TREE"
else tar -xzf .comfy-current/comfyui-current.tar.gz -C "$TREE"; fi
export HYPIR_COMFYUI_DIR=$TREE HYPIR_COMFY_PYTHON=python3 HYPIR_COMFY_GPU=1

# 1. The end-to-end module on the GPU, tiny weights then full-size ones (E2E=0 skips it).
if [ "${E2E:-1}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_comfyui_e2e.py > "$OUT/e2e_${PART}_tiny.txt" 2>&1
  tail -1 "$OUT/e2e_${PART}_tiny.txt"; failures "$OUT/e2e_${PART}_tiny.txt"
  HYPIR_E2E_MODEL_SIZE=sd21 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_comfyui_e2e.py \
    > "$OUT/e2e_${PART}_sd21.txt" 2>&1
  tail -1 "$OUT/e2e_${PART}_sd21.txt"; failures "$OUT/e2e_${PART}_sd21.txt"
fi

# 2. Node overhead against `hypir restore` (under ComfyUI's allocator and the native one), memory after /free.
timeout $(left) python3 benchmarks/comfyui_gpu_check.py --comfyui "$TREE" --python python3 \
  --parts overhead --json "$OUT/comfyui_$PART.json" --logs "$OUT/comfyui_${PART}_logs.txt" --commit "$COMMIT" \
  2>&1 | tee "$OUT/comfyui_$PART.txt"

echo "done at $SECONDS s"
pack "comfyui_$PART.txt"

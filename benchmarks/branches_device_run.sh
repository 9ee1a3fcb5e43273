#!/usr/bin/env bash
# Levers on branches against main, in one GPU call: each branch's tree is carried as an ignored folder
# (.levers/<branch>, made here with `git archive <branch> | tar -x -C .levers/<branch>`; .levers/ is in
# .git/info/exclude) beside this checkout, and every tree runs the same commands on the same warm machine.
#
#   here:    for b in BRANCH...; do mkdir -p .levers/$b && git archive $b | tar -x -C .levers/$b; done
#   device:  bash benchmarks/branches_device_run.sh      (carry .levers .wheels .comfy-small)
#
# Each branch not named *timing*: benchmarks/levers.py (kernels and the pass with each lever off, PSNR against
# float32; a branch's levers.py times its lever against main's code in the same process). Then main and each
# *timing* or *special* branch: benchmarks/first_image.py, each with a Triton cache of its own, cold and then warm (a branch
# that changes the kernels compiles in its cold pass, not in the warm one). Results in $OUT/<tree>/; one
# archive comes back. A tree's own levers.py arguments can be written into its LEVERS_ARGS file (for example
# `--parts pass --off ""` for a tree compared with another on the pass alone); else LEVER_PARTS applies.
set -uo pipefail
OUT=${OUT:-device_out}
LIMIT=${LIMIT:-590}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the trees run from their own folders
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
shopt -s nullglob
wheels=(.wheels/*.whl .comfy-small/*.whl)  # .comfy-small: for comfyui_device_run.sh current next
[ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  "${wheels[@]}" 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
left() { local s=$(( LIMIT - 5 - SECONDS )); echo $(( s > 1 ? s : 1 )); }
trees=(. .levers/*/)
for tree in .levers/*/; do
  name=$(basename "$tree")
  [[ "$name" == *timing* ]] && continue
  mkdir -p "$OUT/$name"
  echo "== $name at $SECONDS s"
  args=(${LEVER_PARTS:+--parts $LEVER_PARTS})
  [ -f "$tree/LEVERS_ARGS" ] && eval "args=($(cat "$tree/LEVERS_ARGS"))"
  (cd "$tree" && TRITON_CACHE_DIR=/tmp/triton_levers PYTHONPATH=/tmp/site:$PWD timeout $(left) python3 benchmarks/levers.py \
    --json "$OUT/$name/levers.json" "${args[@]}") > "$OUT/$name/levers.txt" 2>&1
  grep '^{' "$OUT/$name/levers.txt" | cut -c1-500
done
for tree in "${trees[@]}"; do
  name=$(basename "$(cd "$tree" && pwd)"); [ "$tree" = . ] && name=main
  [ "$name" = main ] || [[ "$name" == *timing* ]] || [[ "$name" == *special* ]] || continue
  mkdir -p "$OUT/$name"
  [ $(left) -gt 60 ] || { echo "no time left for first_image ($name)"; break; }
  for pass in cold warm; do
    [ "$pass" = cold ] && rm -rf /tmp/triton_first_$name
    (cd "$tree" && TRITON_CACHE_DIR=/tmp/triton_first_$name PYTHONPATH=/tmp/site:$PWD timeout $(left) python3 benchmarks/first_image.py \
      --json "$OUT/$name/first_$pass.json") > "$OUT/$name/first_$pass.txt" 2>&1
    echo "== $name first_image $pass"; tail -4 "$OUT/$name/first_$pass.txt"
  done
done
echo "done at $SECONDS s"
tar -czf /tmp/branches.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/branches.tar.gz "$OUT/"

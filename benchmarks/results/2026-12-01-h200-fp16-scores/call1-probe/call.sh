set -x
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 200 python3 .levers/probe1.py $OUT/a attn > $OUT/attn.txt 2>&1; tail -5 $OUT/attn.txt
timeout 200 python3 .levers/probe1.py $OUT/b lanes > $OUT/lanes.txt 2>&1; tail -8 $OUT/lanes.txt
echo "done at $SECONDS s"

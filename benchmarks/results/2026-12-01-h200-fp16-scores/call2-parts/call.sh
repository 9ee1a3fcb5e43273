python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
timeout 300 python3 .levers/probe2.py $OUT/c > $OUT/probe2.txt 2>&1; grep -v "^ " $OUT/probe2.txt | tail -60
echo "done at $SECONDS s"

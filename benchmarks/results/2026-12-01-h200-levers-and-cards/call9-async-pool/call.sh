python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
timeout 420 python3 .levers/asyncoom.py driver $OUT 24

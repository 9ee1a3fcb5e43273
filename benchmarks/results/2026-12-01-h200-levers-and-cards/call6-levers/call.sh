python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cfesite .levers/nvidia_cudnn_frontend-*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt
PYTHONPATH=/tmp/cfesite:$PYTHONPATH timeout 330 python3 benchmarks/conv_attention_levers.py --json $OUT/levers.json > $OUT/levers.txt 2>&1; echo rc $?
tail -c 2500 $OUT/levers.txt
timeout 120 python3 .levers/sig.py 2>&1 | tail -5 | tee $OUT/signature.txt

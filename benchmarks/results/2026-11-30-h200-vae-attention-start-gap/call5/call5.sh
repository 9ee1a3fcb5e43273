set -x
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=$OUT/c3 && mkdir -p $W
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "inference_mode_unload or broken_input or out_of_memory" > $W/gpu_tests.txt 2>&1
tail -3 $W/gpu_tests.txt
timeout 120 python3 benchmarks/cards_check.py memory --sizes 4096 --budgets 24,12,8 --json $W/memory_4096.json > $W/memory_4096.txt 2>&1
tail -4 $W/memory_4096.txt
PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 120 python3 benchmarks/cards_check.py memory --sizes 4096 --budgets 24,12,8 --json $W/memory_4096_async.json > $W/memory_4096_async.txt 2>&1
tail -4 $W/memory_4096_async.txt
echo "done at $SECONDS s"

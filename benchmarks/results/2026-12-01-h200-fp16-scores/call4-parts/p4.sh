python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=$OUT/c4 && mkdir -p $W
timeout 200 python3 .levers/probe4.py $W/probe4.json 2>&1 | tee $W/probe4.txt | cut -c1-150
timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py -k "softmax or vae_attention" > $W/gpu_tests.txt 2>&1
grep -E "matmul attention|passed|failed|Error" $W/gpu_tests.txt | tail -12
echo "done at $SECONDS s"

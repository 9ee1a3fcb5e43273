python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=$OUT/c3 && mkdir -p $W
timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py -k "softmax or vae_attention" > $W/gpu_tests.txt 2>&1
grep -E "matmul attention|passed|failed|Error" $W/gpu_tests.txt | tail -12
for std in 1 3; do
timeout 150 python3 benchmarks/attention_512.py --kernels fp16,softmax --std $std --json $W/attention_std$std.json > $W/attention_std$std.txt 2>&1
cat $W/attention_std$std.txt | cut -c1-160
done
echo "done at $SECONDS s"

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py -k "vae_attention" > $OUT/gpu_tests.txt 2>&1
grep -E "matmul attention|passed|failed" $OUT/gpu_tests.txt | tail -6
timeout 120 python3 .levers/profile2048.py $OUT/profile2048.json 2>&1 | grep -v Warn | tee $OUT/profile2048.txt
echo "done at $SECONDS s"

ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=/tmp/c6 && mkdir -p $W
timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" > $W/gpu_tests.txt 2>&1
grep -E "matmul attention" $W/gpu_tests.txt; tail -3 $W/gpu_tests.txt
timeout 240 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 --budget-gb 8 --repeats 10 --json $W/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $W/speed.txt
tail -12 $W/speed.txt | cut -c1-200
for i in 1 2; do
  (cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 80 python3 $ROOT/.levers/ab.py $W/ab_base_$i.json 20 2>$W/ab_base_$i.err)
  timeout 80 python3 .levers/ab.py $W/ab_main_$i.json 20 2>$W/ab_main_$i.err
done
echo "done at $SECONDS s"
cp $W/speed.json $W/speed.txt $W/gpu_tests.txt $OUT/
tar -czf $OUT/c6.tar.gz -C /tmp c6

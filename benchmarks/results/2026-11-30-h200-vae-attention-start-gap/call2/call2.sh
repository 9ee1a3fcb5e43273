set -x
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=/tmp/c2 && mkdir -p $W
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" > $W/gpu_tests.txt 2>&1
tail -3 $W/gpu_tests.txt
for i in 1 2; do
  (cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 $ROOT/.levers/launch_gap.py $W/gap_base_$i.json > /dev/null 2>$W/gap_base_$i.err)
  timeout 60 python3 .levers/launch_gap.py $W/gap_main_$i.json > /dev/null 2>$W/gap_main_$i.err
done
python3 -c "
import json
for n in ('base_1','main_1','base_2','main_2'):
    d=json.load(open('$W/gap_'+n+'.json')); t=dict((l,v) for l,v in d['timeline_ms'])
    print(n, round(d['plain_ms'],2), 'encoder replay at', t.get('replay in'))
" | tee $W/gap_summary.txt
timeout 240 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 --budget-gb 8 --repeats 10 --json $W/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $W/speed.txt
tail -5 $W/speed.txt
for run in 1 2; do
  timeout 60 python3 benchmarks/first_image.py --json $W/first_main_$run.json > $W/first_main_$run.txt 2>&1
  grep output $W/first_main_$run.txt | cut -c1-200
done
echo "done at $SECONDS s"
cp $W/gap_summary.txt $W/speed.json $W/gpu_tests.txt $OUT/
tar -czf $OUT/c2.tar.gz -C /tmp c2

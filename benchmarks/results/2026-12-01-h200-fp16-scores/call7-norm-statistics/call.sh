ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=/tmp/c8 && mkdir -p $W
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" > $W/gpu_tests.txt 2>&1
grep -E "^FAILED|passed|failed" $W/gpu_tests.txt | tail -8
for i in 1 2; do
  (cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 80 python3 $ROOT/.levers/ab.py $W/ab_base_$i.json 20 2>$W/ab_base_$i.err)
  timeout 80 python3 .levers/ab.py $W/ab_main_$i.json 20 2>$W/ab_main_$i.err
done
python3 - <<'P' | tee $W/ab_summary.txt
import json, statistics
d = {k: [json.load(open(f"/tmp/c8/ab_{k}_{i}.json")) for i in (1, 2)] for k in ("base", "main")}
for size in ("1024", "2048"):
    print(size, "base", [round(r[size]["median_ms"], 2) for r in d["base"]], "main", [round(r[size]["median_ms"], 2) for r in d["main"]])
gain = statistics.mean(r["1024"]["median_ms"] for r in d["base"]) - statistics.mean(r["1024"]["median_ms"] for r in d["main"])
open("/tmp/c8/gain", "w").write("yes" if gain > 0.15 else "no")
print("gain at 1024", round(gain, 3))
P
if [ "$(cat $W/gain)" = yes ] && [ $SECONDS -lt 330 ]; then
timeout 240 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 --budget-gb 8 --repeats 10 --json $W/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $W/speed.txt
grep -E "eager\+graphs|busy" $W/speed.txt | cut -c1-150
fi
echo "done at $SECONDS s"
cp $W/gpu_tests.txt $W/ab_summary.txt $OUT/; [ -f $W/speed.json ] && cp $W/speed.json $W/speed.txt $OUT/
tar -czf $OUT/c8.tar.gz -C /tmp c8

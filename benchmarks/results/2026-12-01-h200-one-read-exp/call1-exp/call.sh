ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/ 2>/dev/null
W=/tmp/s1 && mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $W/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -k "softmax or shifted or vae_attention" > $W/gpu_tests.txt 2>&1
grep -E "^FAILED|passed|failed|matmul attention at" $W/gpu_tests.txt | tail -12
timeout 120 python3 benchmarks/attention_512.py --json $W/attention.json --tokens 36864,65536 --kernels fp16,softmax > $W/attention.txt 2>&1
grep -v "triton " $W/attention.txt | cut -c1-160
for i in 1 2; do
  (cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 80 python3 $ROOT/.levers/ab.py $W/ab_base_$i.json 20 2>$W/ab_base_$i.err)
  timeout 80 python3 .levers/ab.py $W/ab_main_$i.json 20 2>$W/ab_main_$i.err
done
python3 - <<'P' | tee $W/ab_summary.txt
import json
d = {k: [json.load(open(f"/tmp/s1/ab_{k}_{i}.json")) for i in (1, 2)] for k in ("base", "main")}
for size in ("1024", "2048"):
    print(size, "base", [round(r[size]["median_ms"], 2) for r in d["base"]], "main", [round(r[size]["median_ms"], 2) for r in d["main"]])
P
echo "done at $SECONDS s"
cp $W/gpu_tests.txt $W/ab_summary.txt $W/attention.txt $OUT/
tar -czf $OUT/s1.tar.gz -C /tmp s1

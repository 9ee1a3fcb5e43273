# Call A: without flash-attn-4 (as a plain install): the README's speed table, a folder of 200 photos, the first
# image (Triton's cache warm from the speed run; no stored timings, then both warm). Stages flash-attn-4's wheels.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
W=/tmp/a && mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $W/gpu.txt
timeout 260 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 --budget-gb 8 --repeats 10 --json $W/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $W/speed.txt
grep -E "eager\+graphs|busy" $W/speed.txt | cut -c1-150; echo "speed done at $SECONDS s"
timeout 150 python3 benchmarks/folder_run.py --photos 200 --modes stream --workdir /tmp/f2 --json $W/folder.json \
  --logs /tmp/f2/logs --commit $(cat .levers/commit) > $W/folder.txt 2>&1; tail -4 $W/folder.txt | cut -c1-300
cp /tmp/f2/logs/stream.log $W/folder_stream.log 2>/dev/null; echo "folder done at $SECONDS s"
for name in B C; do
  HYPIR_CACHE_DIR=/tmp/hfirst timeout 90 python3 benchmarks/first_image.py --json $W/first_$name.json > $W/first_$name.txt 2>&1
  grep output $W/first_$name.txt | cut -c1-330
done
echo "done at $SECONDS s"
cp $W/speed.json $W/speed.txt $W/folder.json $OUT/ 2>/dev/null
tar -czf $OUT/a.tar.gz -C /tmp a

# Call C: flash-attn-4 installed beside the pack (its wheels unpacked into one folder, as pip would): the GPU
# suite with it present, and the speed table with `auto` free to pick it.
cp .fa4c/* /tmp/fa4/
SITE=/tmp/fa4site && mkdir -p $SITE
cat /tmp/fa4/cu13.part* > /tmp/fa4/cu13.zip
for wheel in /tmp/fa4/*.whl /tmp/fa4/cu13.zip; do python3 -m zipfile -e "$wheel" "$SITE"; done
dsl=$SITE/nvidia_cutlass_dsl
export PYTHONPATH=$SITE:$dsl/python_packages:$dsl/dsl_packages:/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache4 FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
W=/tmp/c && mkdir -p $W
python3 -m hypir doctor > $W/doctor.txt 2>&1; grep -iE "flash" $W/doctor.txt | head -6
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" > $W/gpu_tests.txt 2>&1
grep -E "^FAILED|passed|failed" $W/gpu_tests.txt | tail -8; echo "tests done at $SECONDS s"
timeout $(( 585 - SECONDS )) python3 -m hypir bench --speed --sizes 1024,2048 --modes eager+graphs --budget-size 0 --repeats 10 --json $W/speed_fa4.json 2>&1 | grep -v "^\[HYPIR\]" > $W/speed_fa4.txt
grep -E "eager\+graphs|busy|ran" $W/speed_fa4.txt | cut -c1-200
echo "done at $SECONDS s"
cp $W/speed_fa4.json $W/speed_fa4.txt $W/gpu_tests.txt $OUT/ 2>/dev/null
tar -czf $OUT/c.tar.gz -C /tmp c

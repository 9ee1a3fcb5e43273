ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache PYTHONUNBUFFERED=1
W=/tmp/o && mkdir -p $W
(cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 $ROOT/.levers/oom.py $W/oom_base.json 2>$W/oom_base.err | cut -c1-400)
echo "base done at $SECONDS s"
timeout 150 python3 .levers/oom.py $W/oom_main.json 2>$W/oom_main.err | cut -c1-400
echo "done at $SECONDS s"
tail -3 $W/oom_main.err
cp $W/* $OUT/

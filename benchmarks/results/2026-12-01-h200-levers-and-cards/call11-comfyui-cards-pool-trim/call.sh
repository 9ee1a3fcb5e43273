# call 10 (2 s, carrying .wheels .comfy-small .comfy-current): as call 7
# call 11 (carrying .comfy-av), at eda03ed (the pool trimmed before a pass of tiles sent together):
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .comfy-av/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HYPIR_COMFYUI_DIR=/tmp/comfyui-current HYPIR_COMFY_PYTHON=python3 HYPIR_COMFY_GPU=1
python3 benchmarks/comfyui_gpu_check.py --comfyui /tmp/comfyui-current --python python3 --parts cards --cards 12,24 \
  --json $OUT/comfyui_cards.json --logs $OUT/comfyui_cards_logs.txt --commit eda03ed

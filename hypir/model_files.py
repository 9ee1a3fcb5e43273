"""Where model files are looked for, and downloading them from the Hub (only when asked).

Search order for a file name: the folders given by the caller (ComfyUI's model folders), then
$HYPIR_MODELS_DIR, ./models, and the Hugging Face cache. Downloads go through huggingface_hub, which
shows progress, retries a dropped connection within the run (resuming from what reached the disk), and
moves a file under its final name only once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import config as _config
from .errors import BASE_ALLOW_PATTERNS, BASE_FOLDER, HYPIRLoadError, one_line

logger = logging.getLogger("hypir")

MODELS_DIR_ENV = "HYPIR_MODELS_DIR"


def search_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    dirs = [Path(d) for d in (extra or [])]
    if os.environ.get(MODELS_DIR_ENV):
        dirs.append(Path(os.environ[MODELS_DIR_ENV]).expanduser())
    dirs.append(Path.cwd() / "models")
    return dirs


def find_file(name: str, extra_dirs: list | None = None) -> Path | None:
    for folder in search_dirs(extra_dirs):
        candidate = folder / name
        if candidate.exists():
            return candidate
    return None


def find_base(filename: str, extra_dirs: list | None = None) -> Path | None:
    """The SD2.1 base in the model folders: the single file, or the diffusers folder `hypir download` writes."""
    for folder in search_dirs(extra_dirs):
        if (folder / filename).is_file():
            return folder / filename
        if (folder / BASE_FOLDER / "unet").is_dir():
            return folder / BASE_FOLDER
    return None


def find_models(extra_dirs: list | None = None) -> tuple[Path | None, Path | None]:
    """(weights, base) found locally: the model folders, then the Hugging Face cache; None where missing."""
    cfg = _config.load_config()
    return _find_weights(cfg, extra_dirs), _find_base(cfg, extra_dirs)


def _find_weights(cfg: dict, extra_dirs: list | None) -> Path | None:
    return find_file(cfg["weights_file"], extra_dirs) or _cached_hub_file(cfg["weights_repo"], cfg["weights_file"])


def _find_base(cfg: dict, extra_dirs: list | None) -> Path | None:
    return find_base(cfg["base_model_file"], extra_dirs) or _cached_hub_snapshot(cfg["base_model_repo"])


def _cached_hub_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def _cached_hub_snapshot(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=BASE_ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


@dataclass
class ModelFiles:
    base: str
    weights: str


def resolve_model_files(base: str | None = None, weights: str | None = None, allow_download: bool = False,
                        extra_dirs: list | None = None, download_dir: str | os.PathLike | None = None) -> ModelFiles:
    """Paths for the base model and the HYPIR weights: given ones as they are, else found, else downloaded
    (only with allow_download), else an error that says which file to put where."""
    cfg = _config.load_config()
    places = ", ".join(str(d) for d in search_dirs(extra_dirs)) + " and the Hugging Face cache"
    target = Path(download_dir or search_dirs(extra_dirs)[0])
    if weights is None:
        found_weights = _find_weights(cfg, extra_dirs)  # only what was not given is looked for
        if found_weights is None and allow_download:
            found_weights = download_weights(target, cfg["weights_repo"], cfg["weights_file"])
        if found_weights is None:
            raise HYPIRLoadError(
                f"HYPIR weights {cfg['weights_file']} not found (looked in {places}). Pass --download to fetch them "
                f"from https://huggingface.co/{cfg['weights_repo']} now, run `hypir download` here, or give the "
                f"file with --weights PATH")
        weights = str(found_weights)
    if base is None:
        found_base = _find_base(cfg, extra_dirs)
        if found_base is None and allow_download:
            found_base = download_base(target / BASE_FOLDER, cfg["base_model_repo"])
        if found_base is None:
            raise HYPIRLoadError(
                f"base model not found (looked for {cfg['base_model_file']} and a {BASE_FOLDER} folder in {places}, "
                f"and for {cfg['base_model_repo']} in the Hugging Face cache). Pass --download to fetch it now, run "
                f"`hypir download --base-only` here, or give an SD2.1-base checkpoint or diffusers folder with "
                f"--base PATH")
        base = str(found_base)
    return ModelFiles(base, weights)


def _by_hand(folder: Path, files: str) -> str:
    return f"Place {files} there by hand: {folder}"


@contextlib.contextmanager
def _download_errors(what: str, repo: str, folder: Path, files: str):
    """Offline or unreachable Hub: one message that says which files to put in which folder."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, OSError) as exc:
        reason = "HF_HUB_OFFLINE is set" if isinstance(exc, OfflineModeIsEnabled) or os.environ.get(
            "HF_HUB_OFFLINE") == "1" else one_line(exc)
        raise HYPIRLoadError(f"cannot download {what} from https://huggingface.co/{repo} ({reason}). "
                             f"{_by_hand(folder, files)}") from exc


def verify_download(path: Path, folder: Path, filename: str) -> None:
    """Compare a fresh download with the sha256 the Hub sent for it (LFS files); delete it if it differs."""
    try:
        from huggingface_hub._local_folder import read_download_metadata
    except ImportError:  # a huggingface_hub without local-dir metadata: its own size check stands
        logger.debug("[HYPIR] no download metadata in this huggingface_hub; sha256 not checked")
        return
    metadata = read_download_metadata(folder, filename)
    expected = (metadata.etag if metadata else "").strip('"').lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        return  # not an LFS file: the Hub publishes no sha256 for it
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        path.unlink()
        raise HYPIRLoadError(f"{path}: the download is damaged (sha256 {digest.hexdigest()[:16]}... instead of the "
                             f"Hub's {expected[:16]}...); it was deleted: download it again")


def download_weights(folder: str | os.PathLike, repo: str | None = None, filename: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    cfg = _config.load_config()
    repo, filename = repo or cfg["weights_repo"], filename or cfg["weights_file"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("[HYPIR] downloading %s from %s into %s", filename, repo, folder)
    with _download_errors(filename, repo, folder, filename):
        path = Path(hf_hub_download(repo, filename, local_dir=str(folder)))
    verify_download(path, folder, filename)
    return path


def download_base(folder: str | os.PathLike, repo: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    repo = repo or _config.load_config()["base_model_repo"]
    folder = Path(folder)
    logger.info("[HYPIR] downloading %s into %s", repo, folder)
    files = "the SD2.1-base diffusers folder (" + ", ".join(BASE_ALLOW_PATTERNS) + ")"
    with _download_errors("the base model", repo, folder, files):
        path = Path(snapshot_download(repo, allow_patterns=BASE_ALLOW_PATTERNS, local_dir=str(folder)))
    for pattern in ("unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"):
        for file in path.glob(pattern):
            verify_download(file, path, file.relative_to(path).as_posix())
    return path

"""Errors and names that the command line needs before torch is imported (`hypir download`, `--help`), and how
a caught exception is named in a message: its type and the first line of its text."""

from __future__ import annotations


class HYPIRLoadError(RuntimeError):
    """A model file that cannot be used, with what it seems to be and what to do."""


# The files of an SD2.1-base diffusers folder that HYPIR uses: what `hypir download` fetches and what the
# Hugging Face cache is searched for.
BASE_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
# The folder `hypir download` puts the base model in, inside the models folder; restore, doctor and the nodes
# look for it there.
BASE_FOLDER = "stable-diffusion-2-1-base"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for messages that name the
    file themselves."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


__all__ = ["BASE_ALLOW_PATTERNS", "BASE_FOLDER", "HYPIRLoadError", "first_line", "one_line"]

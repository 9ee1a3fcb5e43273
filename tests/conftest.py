"""Shared fixtures: one tiny SD2-shaped model (random weights) written as a diffusers folder plus a
HYPIR-format LoRA file, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import smooth_image, write_random_model

# The tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Nor the user's cache: attention timings are kept on disk only where a test asks for it (a folder of its own).
os.environ["HYPIR_CACHE_DIR"] = ""
# The GPU tests are collected only where they can run (tests/test_gpu*.py; `bash benchmarks/device_check.sh`).
collect_ignore = [] if torch.cuda.is_available() else ["test_gpu.py", "test_gpu_kernels.py"]



# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_kernels.py); it is chosen when
# Triton is imported, so before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_models(tiny_files):
    from hypir.runtime import load_models

    folder, weights = tiny_files
    return load_models(folder, weights, device="cpu", dtype="fp32")


@pytest.fixture()
def pipe(tiny_models):
    from hypir.pipeline import HYPIRPipeline

    return HYPIRPipeline(tiny_models)


@pytest.fixture()
def image_factory():
    return smooth_image

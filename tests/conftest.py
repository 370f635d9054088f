"""Test-wide environment: offline Hugging Face, the Triton interpreter without a GPU, DeepSpeed on
CPU with a project-private extension cache. Set before anything imports those libraries."""
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~30 s; CI runs it only if nothing else covers it")

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/videos.py and other helpers


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: as fast, and no stalls when other
    processes share a small CPU. Restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

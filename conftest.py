"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is
decided here, before the kernels package is imported: on a machine without CUDA the kernels
run in Triton's CPU interpreter."""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the gate pool's vector cache (lemoe_engine.vector_cache) goes to a folder of this session, not
# the user's ~/.cache; tests that check the cache set their own
if "LEMOE_POOL_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lemoe-test-cache-")
    os.environ["LEMOE_POOL_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton, bf16); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they lose a lot."""
    import torch as _torch
    n = _torch.get_num_threads()
    _torch.set_num_threads(1)
    yield
    _torch.set_num_threads(n)

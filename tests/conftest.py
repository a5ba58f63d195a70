import os

import pytest
import torch

# Tests never reach a model hub; the embedded model comes from PyPI, the embedder from site-packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: runs the real embedded model (uses every core)")


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run far faster on one thread (no OpenMP hand-off); the real model gets all cores."""
    before = torch.get_num_threads()
    if request.node.get_closest_marker("real_model") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """For modules whose module-scoped fixtures build and train tiny models (they run before
    `_threads`): the same one thread for them. Use with pytestmark = usefixtures(...)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

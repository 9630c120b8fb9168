import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Training tests run tiny models at batch 2-4: one thread is faster than two fighting for shared cores
    (several-fold here, measured), and the previous setting is restored for the tests that follow."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory, monkeypatch):
    """Folder indexes go to a temporary cache, not the user's ~/.cache."""
    monkeypatch.setenv("MOVQ_DEPLOY_CACHE", str(tmp_path_factory.mktemp("index_cache")))

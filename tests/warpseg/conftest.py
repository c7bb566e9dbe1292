"""WarpSeg tests run torch on one thread: the 2-core CI machine is shared, and OpenMP threads
spinning against other jobs made a 60-step toy fit take minutes instead of seconds."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The heap policy (utils/host_memory.py): by default every buffer stays on the heap and loss passes trim it every
16 batches, the other policies are chosen by ABU_HEAP, and no policy changes a loss."""
import numpy as np
import pytest

import utils.host_memory as host_memory
from utils.data import LaionCandidates
from utils.losses import collect_losses


@pytest.fixture(autouse=True)
def restore_policy():
    yield
    host_memory.TRIM_EVERY_BATCHES = host_memory.TRIM_EVERY


def test_policies_and_their_names(monkeypatch):
    monkeypatch.delenv("ABU_HEAP", raising=False)
    assert host_memory.configure_heap() == "heap+trim" and host_memory.TRIM_EVERY_BATCHES == 16
    assert host_memory.keep_buffers_on_heap()  # every buffer on the heap (mallopt accepted)
    monkeypatch.setenv("ABU_HEAP", "glibc")
    assert host_memory.configure_heap() == "glibc" and host_memory.TRIM_EVERY_BATCHES == 0
    assert host_memory.configure_heap("trim") == "trim" and host_memory.TRIM_EVERY_BATCHES == 16
    with pytest.raises(ValueError, match="choose one of heap\\+trim, trim, glibc"):
        host_memory.configure_heap("tcmalloc")
    assert host_memory.trim_heap()  # glibc's malloc_trim is there (Linux)


def test_a_loss_pass_trims_every_16_batches_and_the_losses_do_not_change(base_model, tiny_abc, monkeypatch):
    laion = LaionCandidates(tiny_abc["dataroot"], 12)  # 24 rows, 1 candidate per batch of B = T = 5: 24 batches
    trims = []
    monkeypatch.setattr(host_memory, "trim_heap", lambda: trims.append(1) or True)
    host_memory.TRIM_EVERY_BATCHES = 0
    untrimmed = collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=5, time_samples=5)
    assert trims == []
    host_memory.TRIM_EVERY_BATCHES = host_memory.TRIM_EVERY
    trimmed = collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=5, time_samples=5)
    assert len(trims) == 1  # after batch 16 of 24
    host_memory.TRIM_EVERY_BATCHES = 1
    every = collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=5, time_samples=5)
    assert len(trims) == 1 + 24
    np.testing.assert_array_equal(trimmed, untrimmed)
    np.testing.assert_array_equal(every, untrimmed)

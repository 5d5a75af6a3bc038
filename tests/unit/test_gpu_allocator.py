"""GPUs are handed out one per process: exclusively, or shared on request (one-GPU runs)."""

import pytest

from forge.controller.provisioner import SHARE_GPUS_ENV, GpuAllocator


def test_each_process_gets_its_own_gpu_and_a_shortage_says_how_to_share(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv(SHARE_GPUS_ENV, raising=False)
    allocator = GpuAllocator()
    policy, trainer = allocator.allocate(1, "policy"), allocator.allocate(1, "trainer")
    assert policy != trainer and sorted(policy + trainer) == ["0", "1"]
    with pytest.raises(ValueError, match=f"ref_model needs 1 GPU.*{SHARE_GPUS_ENV}=1"):
        allocator.allocate(1, "ref_model")
    allocator.release(policy)
    assert allocator.allocate(1, "ref_model") == policy


def test_shared_gpus_go_to_the_least_shared_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv(SHARE_GPUS_ENV, "1")
    allocator = GpuAllocator()
    assert allocator.allocate(3, "trainer") == ["0", "1", "0"]
    assert allocator.allocate(1, "policy") == ["1"]
    allocator.release(["0", "0"])
    assert allocator.allocate(1, "ref_model") == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert allocator.allocate(2, "policy") == ["0", "0"]  # one GPU runs every part

"""The shared-memory weight store without processes: atomic versions, cleanup, sweep."""

import subprocess
import sys

import pytest
import torch

from forge.weights import WeightStore, sweep_stale_segments


@pytest.fixture
def store(tmp_path):
    s = WeightStore("unit", directory=tmp_path)
    yield s
    s.close()


def test_a_published_version_reads_back_bit_for_bit_in_every_dtype(store):
    state = {"w": torch.randn(5, 3), "i": torch.arange(7), "h": torch.randn(4).to(torch.bfloat16),
             "scalar": torch.tensor(3.5), "empty": torch.empty(0, 2)}
    path = store.publish(state, 3)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with store.open(3) as tensors:
        assert list(tensors) == list(state)
        for key, value in state.items():
            assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value)
    copy = store.read(3)
    assert torch.equal(copy["w"], state["w"])


def test_old_versions_are_dropped_and_close_removes_everything(store, tmp_path):
    for version in (1, 2, 3):
        store.publish({"w": torch.full((2,), float(version))}, version)
    assert store.find(1) is None and store.find(2) is None and store.find(3) is not None
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_an_idle_segment_too_small_for_the_next_version_gives_its_space_back(store, tmp_path):
    store.publish({"w": torch.zeros(10)}, 1)
    store.publish({"w": torch.zeros(10)}, 2)  # version 1's segment is kept idle for reuse
    store.publish({"w": torch.zeros(1000)}, 3)  # too big for it: it is removed, not kept for ever
    assert len(list(tmp_path.iterdir())) == 2  # version 3, and version 2's segment (idle)
    assert torch.equal(store.read(3)["w"], torch.zeros(1000))


async def test_a_reader_waits_a_bounded_time_for_a_version_that_never_comes_and_open_never_waits(store):
    with pytest.raises(TimeoutError, match="push_weights"):
        await store.wait_for(9, timeout_s=0.2)
    with pytest.raises(LookupError, match=r"await wait_for\(9\) before opening it"):
        with store.open(9):
            pass


async def test_waiting_for_a_version_already_replaced_fails_at_once_naming_the_newer_one(store):
    for version in (11, 12):
        store.publish({"w": torch.zeros(2)}, version)
    assert store.newest_version() == 12
    with pytest.raises(LookupError, match="version 11 .* replaced by version 12"):
        await store.wait_for(11, timeout_s=60)  # would otherwise wait the whole minute
    await store.wait_for(12, timeout_s=1)


def test_stores_with_different_names_do_not_see_each_other(tmp_path):
    a, b = WeightStore("run-a", directory=tmp_path), WeightStore("run-b", directory=tmp_path)
    a.publish({"w": torch.zeros(1)}, 1)
    assert b.find(1) is None
    a.close()


def test_leftovers_of_a_killed_process_are_swept_and_live_ones_kept(tmp_path):
    code = (
        "import os, torch, sys; from forge.weights import WeightStore;"
        f"WeightStore('crashed', directory={str(tmp_path)!r}).publish({{'w': torch.ones(3)}}, 1);"
        "open(os.path.join(sys.argv[1], '.forge-w.crashed.v2.' + str(os.getpid()) + '.bin.abcd1234.tmp'), 'w');"
        "os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2  # a finished version and a half-written one
    live = WeightStore("live", directory=tmp_path)
    live.publish({"w": torch.zeros(1)}, 1)  # opening for publishing sweeps
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.find(1).name]
    assert sweep_stale_segments(tmp_path) == []
    live.close()


def test_bad_store_names_are_refused():
    with pytest.raises(ValueError, match="letters"):
        WeightStore("../etc")


def test_a_publish_that_fails_halfway_leaves_no_file_and_the_previous_version_readable(store, tmp_path):
    store.publish({"w": torch.ones(3)}, 1)
    with pytest.raises(Exception):
        store.publish({"w": torch.ones(3), "broken": torch.empty(4, device="meta")}, 2)
    assert store.find(2) is None
    assert not [p for p in tmp_path.iterdir() if ".v2." in p.name or ".tmp" in p.name]
    with store.open(1) as tensors:
        assert torch.equal(tensors["w"], torch.ones(3))
    store.publish({"w": torch.zeros(3)}, 2)
    assert torch.equal(store.read(2)["w"], torch.zeros(3))

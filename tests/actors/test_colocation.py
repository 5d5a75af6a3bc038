"""Several actors in one ProcGroup: shared processes, reference-counted shutdown, placement checks."""

import asyncio
import os
import signal

import pytest

from forge.controller import (
    ForgeActor,
    ForgeUsageError,
    ProcGroup,
    ReplicaFailed,
    actor_alive,
    actor_answers,
    actor_pids,
    init_hosts,
)
from forge.util.procs import pid_alive
from tests.actors.service_actors import Tally, Worker
from tests.helpers import async_wait_until, monarch_descendants

pytestmark = pytest.mark.timeout(120)


async def test_two_actor_classes_share_one_process_which_stops_with_the_last_of_them(tmp_path):
    before = set(monarch_descendants())
    light = ProcGroup("light")
    assert set(monarch_descendants()) == before  # nothing is spawned before the first actor
    marker = tmp_path / "tally_cleaned_up"
    worker = tally = None
    try:
        worker = await Worker.options(on=light).as_actor()
        tally = await Tally.options(on=light).as_actor(cleanup_marker=str(marker))
        pid = (await worker.whoami.call_one())["pid"]
        assert (await tally.add.call_one(2)) == (2, pid)
        assert actor_pids(worker) == actor_pids(tally) == (pid,)
        assert set(monarch_descendants()) - before == {pid}
        # A frozen process is alive but answers no ping, for either of its actors.
        os.kill(pid, signal.SIGSTOP)
        try:
            assert await actor_alive(worker)
            assert [await actor_answers(a, timeout_s=1) for a in (worker, tally)] == [False, False]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await actor_answers(worker) and await actor_answers(tally)

        await ForgeActor.shutdown(tally)  # its actor stops (and cleans up); the process stays for the worker
        assert marker.read_text() == "2"
        assert (await worker.whoami.call_one())["pid"] == pid and await actor_alive(worker)
        with pytest.raises(ForgeUsageError, match="shut down already"):
            await ForgeActor.shutdown(tally)
        tally = None

        await ForgeActor.shutdown(worker)  # the last one: the group's process stops
        worker = None
        assert await async_wait_until(lambda: not pid_alive(pid), 15)
        assert await async_wait_until(lambda: set(monarch_descendants()) <= before, 15)
    finally:
        for actor in (worker, tally):
            if actor is not None:
                await ForgeActor.shutdown(actor)
        await light.stop()


async def test_failures_and_mismatched_placements_on_a_group_raise_clearly(monkeypatch, tmp_path):
    light = ProcGroup("light")
    with pytest.raises(ValueError, match="as_actor"):  # a service's replicas never share processes
        await Worker.options(on=light).as_service()
    with pytest.raises(ValueError, match=r"option 'on' must be a forge.controller.ProcGroup"):
        Worker.options(on="light")
    # The group's first spawn fails (no GPU): both concurrent callers get the error ...
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("FORGE_SHARE_GPUS", raising=False)
    results = await asyncio.gather(*(Worker.options(with_gpus=True, on=light).as_actor() for _ in range(2)),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError] and "needs 1 GPU(s)" in str(results[0])
    before = set(monarch_descendants())
    actors = []
    try:
        worker = await Worker.options(on=light).as_actor()  # ... and the group can be tried again
        actors.append(worker)
        pid = (await worker.whoami.call_one())["pid"]
        with pytest.raises(ValueError, match=r"ProcGroup 'light' runs its actors with procs=1.*asks for procs=2"):
            await Tally.options(procs=2, on=light).as_actor()
        with pytest.raises(ValueError, match="with_gpus=True"):
            await Tally.options(with_gpus=True, on=light).as_actor()
        assert set(monarch_descendants()) - before == {pid}  # the refused actors spawned nothing
        assert (await worker.whoami.call_one())["pid"] == pid
        # An actor failing on the group leaves its neighbour running; Monarch then spawns no more there.
        marker = tmp_path / "refuse"
        marker.touch()
        with pytest.raises(ReplicaFailed, match="failed to start"):
            await Worker.options(on=light).as_actor(fail_init_if_exists=str(marker))
        assert (await worker.whoami.call_one())["pid"] == pid
        with pytest.raises(ReplicaFailed, match=r"no more actors on processes where one failed.*group.stop\(\)"):
            await Tally.options(on=light).as_actor()
        await light.stop()  # fresh processes take actors again
        actors.append(await Tally.options(on=light).as_actor())
        assert (await actors[-1].add.call_one(3))[0] == 3
    finally:
        for actor in actors:
            await ForgeActor.shutdown(actor)
        await light.stop()


async def test_concurrent_first_actors_spawn_one_process_and_stop_ends_it_for_all():
    before = set(monarch_descendants())
    light = ProcGroup("light")
    tallies = []
    try:
        tallies = await asyncio.gather(*(Tally.options(on=light).as_actor() for _ in range(3)))
        answers = [await t.add.call_one(i) for i, t in enumerate(tallies)]
        assert [total for total, _ in answers] == [0, 1, 2]  # three actors, each with its own state ...
        pids = {pid for _, pid in answers}
        assert len(pids) == 1 and set(monarch_descendants()) - before == pids  # ... in one process
        await light.stop()  # whatever actors are still on it
        assert await async_wait_until(lambda: not any(pid_alive(p) for p in pids), 15)
        assert not any([await actor_alive(t) for t in tallies])
        await light.stop()  # idempotent
        for tally in tallies:  # shutting its actors down afterwards is fine
            await ForgeActor.shutdown(tally)
        tallies = []
        assert await async_wait_until(lambda: set(monarch_descendants()) <= before, 15)
    finally:
        for tally in tallies:
            await ForgeActor.shutdown(tally)
        await light.stop()


async def test_a_group_on_a_host_pool_holds_one_placement_until_its_last_actor_goes():
    pool = await init_hosts({"source": "process_job", "groups": {"gen": 1}})
    light = ProcGroup("light")
    try:
        worker = await Worker.options(hosts=1, host_group="gen", on=light).as_actor()
        tally = await Tally.options(hosts=1, host_group="gen", on=light).as_actor()
        pid = (await worker.whoami.call_one())["pid"]
        assert (await tally.add.call_one(1))[1] == pid
        assert [s.placements for s in await pool.statuses()] == [1]
        await ForgeActor.shutdown(worker)
        assert await actor_alive(tally) and [s.placements for s in await pool.statuses()] == [1]
        await ForgeActor.shutdown(tally)
        assert [s.placements for s in await pool.statuses()] == [0]
        assert await async_wait_until(lambda: not pid_alive(pid), 15)
    finally:
        await light.stop()
        await pool.shutdown()

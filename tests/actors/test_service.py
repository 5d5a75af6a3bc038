"""Service behaviour on real local Monarch processes: routing, sessions, failures."""

import asyncio
import os
import signal
import time

import pytest

from forge.controller import EndpointError, ForgeUsageError, ReplicaFailed, ServiceUnavailable
from forge.controller.service.types import ReplicaFailure
from tests.actors.service_actors import Caller, Gauge, Worker
from tests.helpers import async_wait_until, monarch_descendants

pytestmark = pytest.mark.timeout(120)


async def wait_all_healthy(service, count, timeout_s=30.0):
    async def healthy():
        return (await service.statistics()).num_healthy == count

    assert await async_wait_until(healthy, timeout_s, 0.1), (await service.statistics()).table()


async def test_route_spreads_calls_over_replicas_and_setup_ran_everywhere():
    service = await Worker.options(num_replicas=4).as_service()
    try:
        seen = [await service.whoami.route() for _ in range(40)]
        counts = {r: sum(s["replica"] == r for s in seen) for r in range(4)}
        assert counts == {0: 10, 1: 10, 2: 10, 3: 10}
        assert all(s["is_set_up"] for s in seen)
    finally:
        await service.shutdown()


async def test_fanout_answers_from_every_replica_in_replica_order():
    service = await Worker.options(num_replicas=3).as_service()
    try:
        answers = await service.whoami.fanout()
        assert [a["replica"] for a in answers] == [0, 1, 2]
        assert len({a["pid"] for a in answers}) == 3
    finally:
        await service.shutdown()


async def test_each_task_gets_its_own_sticky_session():
    service = await Worker.options(num_replicas=3).as_service()
    try:
        async def conversation():
            async with service.session():
                replicas = set()
                for _ in range(6):
                    replicas.add((await service.whoami.route())["replica"])
                    await asyncio.sleep(0)
                return replicas

        first, second = await asyncio.gather(conversation(), conversation())
        assert len(first) == 1 and len(second) == 1
        assert first != second
        # outside a session the task is routed round robin again
        outside = {(await service.whoami.route())["replica"] for _ in range(3)}
        assert outside == {0, 1, 2}
    finally:
        await service.shutdown()


async def test_user_exception_reaches_the_caller_and_the_replica_keeps_serving():
    service = await Worker.options(num_replicas=2).as_service()
    try:
        async with service.session():
            pid = (await service.whoami.route())["pid"]
            with pytest.raises(EndpointError) as info:
                await service.fail.route("no such key")
            assert (await service.whoami.route())["pid"] == pid
        error = info.value
        assert isinstance(error.original, KeyError)
        assert error.original_type == "builtins.KeyError"
        assert "no such key" in error.message
        assert "in fail" in error.remote_traceback
        stats = await service.statistics()
        assert all(r.num_restarts == 0 and r.state == "healthy" for r in stats.replicas)
    finally:
        await service.shutdown()


async def test_sigkill_of_one_replica_during_200_calls_fails_none_and_it_comes_back():
    service = await Worker.options(num_replicas=4).as_service()
    try:
        pids = [a["pid"] for a in await service.whoami.fanout()]
        calls = [asyncio.ensure_future(service.work.route(i, 0.02)) for i in range(200)]
        await asyncio.sleep(0.15)
        os.kill(pids[1], signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        assert sorted(x for x, _ in results) == list(range(200))
        await wait_all_healthy(service, 4)
        stats = await service.statistics()
        assert stats.replicas[1].num_restarts == 1
        new_pids = [a["pid"] for a in await service.whoami.fanout()]
        assert len(new_pids) == 4 and pids[1] not in new_pids
    finally:
        await service.shutdown()


async def test_a_rebuilt_replica_gets_the_latest_fanout_of_replayed_endpoints_before_it_serves():
    service = await Worker.options(num_replicas=2).as_service()
    try:
        for version in (1, 2, 3):
            await service.load_weights.fanout(version)
        await service.tune.rolling("fast")
        await service.note.fanout("not replayed")
        pids = [a["pid"] for a in await service.whoami.fanout()]
        os.kill(pids[0], signal.SIGKILL)
        await async_wait_until(lambda: _restarted(service, 0), 30, 0.1)
        await wait_all_healthy(service, 2)
        rebuilt, kept = await service.whoami.fanout()
        assert rebuilt["pid"] not in pids and kept["pid"] == pids[1]
        assert rebuilt["weights_version"] == 3 and rebuilt["tunings"] == ["fast"]  # latest call, each once
        assert kept["weights_version"] == 3 and kept["tunings"] == ["fast", "not replayed"]
        # A replica dying during such a call does not fail it: its rebuild gets the call.
        update = asyncio.ensure_future(service.load_weights.fanout(4, 1.0))
        await asyncio.sleep(0.3)
        os.kill(kept["pid"], signal.SIGKILL)
        first, second = await update
        assert first == 4 and isinstance(second, ReplicaFailure)  # replica order; replica 1 died
        await async_wait_until(lambda: _restarted(service, 1), 30, 0.1)
        await wait_all_healthy(service, 2)
        assert [a["weights_version"] for a in await service.whoami.fanout()] == [4, 4]
    finally:
        await service.shutdown()


async def _restarted(service, replica_id):
    return (await service.statistics()).replicas[replica_id].num_restarts == 1


async def test_a_session_moves_when_its_replica_dies():
    service = await Worker.options(num_replicas=2).as_service()
    try:
        async with service.session():
            first = await service.whoami.route()
            os.kill(first["pid"], signal.SIGKILL)
            second = await service.whoami.route()
            third = await service.whoami.route()
        assert second["pid"] != first["pid"]
        assert third["pid"] == second["pid"]
    finally:
        await service.shutdown()


async def test_hung_replica_is_found_by_the_probe_and_rebuilt():
    service = await Worker.options(
        num_replicas=2, health_probe_interval_s=0.2, health_probe_timeout_s=1.5, max_retries=0
    ).as_service()
    try:
        started = time.monotonic()
        with pytest.raises(ReplicaFailed, match="hang"):
            await service.hang.route()
        assert time.monotonic() - started < 10
        await wait_all_healthy(service, 2)
        stats = await service.statistics()
        assert sum(r.num_restarts for r in stats.replicas) == 1
        assert any("hung" in (r.last_failure or "") for r in stats.replicas)
        assert len(await service.whoami.fanout()) == 2
    finally:
        await service.shutdown()


@pytest.mark.parametrize("poison", ["die", "hang"])
async def test_a_request_that_takes_down_poison_threshold_replicas_fails_and_spares_the_rest(poison):
    service = await Worker.options(
        num_replicas=3, health_probe_interval_s=0.2, health_probe_timeout_s=1.5, max_retries=5
    ).as_service()
    try:
        with pytest.raises(ReplicaFailed, match=rf"(?s){poison}\.route\(\) was running on 2 replicas.*poison_threshold=2"):
            await getattr(service, poison).route()
        await wait_all_healthy(service, 3)
        stats = await service.statistics()
        assert sorted(r.num_restarts for r in stats.replicas) == [0, 1, 1]  # the third replica was spared
        assert len(await service.whoami.fanout()) == 3
    finally:
        await service.shutdown()


async def test_a_handle_passed_to_another_actor_routes_sessions_and_fans_out_there():
    service = await Worker.options(num_replicas=2).as_service()
    caller = await Caller.as_actor()
    try:
        seen = await caller.use.call_one(service)
        assert seen["pid"] != os.getpid()
        assert sorted(seen["routed"]) == [0, 0, 1, 1]
        assert len(seen["pinned"]) == 1
        assert seen["fanout"] == [0, 1]
    finally:
        await Caller.shutdown(caller)
        await service.shutdown()


async def test_a_killed_controller_is_replaced_its_replicas_adopted_and_no_call_fails():
    before = set(monarch_descendants())
    service = await Worker.options(num_replicas=2).as_service()
    caller = await Caller.as_actor()
    try:
        await caller.hold.call_one(service)  # another process holds a handle from before the kill
        replica_pids = [a["pid"] for a in await service.whoami.fanout()]
        old = await service.statistics()
        failures, completed, stop = [], [0], False

        async def load():
            while not stop:
                try:
                    await service.work.route(1, 0.01)
                    completed[0] += 1
                except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                    failures.append(e)

        callers = [asyncio.ensure_future(load()) for _ in range(8)]
        assert await async_wait_until(lambda: completed[0] >= 50, 30)
        os.kill(old.controller_pid, signal.SIGKILL)

        async def replaced():
            stats = await service.statistics()
            return stats.controller_incarnation == 1 and stats.num_healthy == 2

        assert await async_wait_until(replaced, 30, 0.1)
        new = await service.statistics()
        assert new.controller_pid != old.controller_pid
        assert [r.pids[0] for r in new.replicas] == replica_pids  # adopted, not rebuilt
        done_at_swap = completed[0]
        assert await async_wait_until(lambda: completed[0] >= done_at_swap + 50, 30)
        assert sorted(await caller.use_held.call_one()) == [0, 0, 1, 1]  # found the new controller
        # The new controller watches adopted replicas by pid: a dead one is rebuilt.
        os.kill(replica_pids[0], signal.SIGKILL)

        async def rebuilt():
            stats = await service.statistics()
            return stats.replicas[0].num_restarts == 1 and stats.num_healthy == 2

        assert await async_wait_until(rebuilt, 30, 0.1)
        done_at_rebuild = completed[0]
        assert await async_wait_until(lambda: completed[0] >= done_at_rebuild + 50, 30)
        stop = True
        await asyncio.gather(*callers)
        assert failures == []
    finally:
        await Caller.shutdown(caller)
        await service.shutdown()
    assert await async_wait_until(lambda: set(monarch_descendants()) <= before, 15)  # adopted ones too


async def test_service_adverbs_that_do_not_apply_name_the_right_ones():
    service = await Worker.options(num_replicas=2).as_service()
    try:
        with pytest.raises(ForgeUsageError, match=r"\.route\(\)"):
            service.whoami.choose()
        with pytest.raises(ForgeUsageError, match=r"\.fanout\(\)"):
            service.whoami.call()
        with pytest.raises(ForgeUsageError, match="num_replicas=2"):
            await service.whoami.call_one()
        with pytest.raises(AttributeError, match="whoami"):
            service.no_such_endpoint
    finally:
        await service.shutdown()


async def test_multi_process_replicas_answer_from_rank_zero_or_all_ranks():
    service = await Worker.options(procs=2, num_replicas=2).as_service()
    every_rank = await Worker.options(procs=2, all_ranks=True).as_service()
    try:
        answer = await service.whoami.route()
        assert answer["rank"] == 0 and answer["world_size"] == 2
        both = await every_rank.whoami.route()
        assert [a["rank"] for a in both] == [0, 1]
        assert both[0]["master_port"] == both[1]["master_port"]
        assert all(a["is_set_up"] for a in both)
        ports = {a["master_port"] for a in await service.whoami.fanout()}
        assert len(ports) == 2  # each replica its own torch.distributed rendezvous
    finally:
        await asyncio.gather(service.shutdown(), every_rank.shutdown())


async def test_gpus_are_given_one_per_process_across_replicas(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    service = await Worker.options(procs=2, num_replicas=2, with_gpus=True, all_ranks=True).as_service()
    try:
        ranks = [rank for replica in await service.whoami.fanout() for rank in replica]
        assert sorted(r["cuda_visible_devices"] for r in ranks) == ["0", "1", "2", "3"]
        with pytest.raises(ValueError, match="0 are free"):
            await Worker.options(with_gpus=True).as_actor()
    finally:
        await service.shutdown()
    actor = await Worker.options(procs=2, with_gpus=True).as_actor()  # freed by shutdown
    await Worker.shutdown(actor)


async def test_fanout_raises_by_default_or_marks_failures_when_partial():
    strict = await Worker.options(num_replicas=3).as_service()
    partial = await Worker.options(num_replicas=3, fanout_partial=True).as_service()
    try:
        with pytest.raises(EndpointError, match="replica 1 refuses"):
            await strict.fail_on_replica.fanout(1)
        results = await partial.fail_on_replica.fanout(1)
        assert results[0] == 0 and results[2] == 2
        assert isinstance(results[1], ReplicaFailure)
        assert isinstance(results[1].error, EndpointError) and not results[1].is_infrastructure
    finally:
        await asyncio.gather(strict.shutdown(), partial.shutdown())


async def test_a_replica_is_never_sent_more_than_its_concurrency_limit():
    service = await Gauge.options(num_replicas=1, max_concurrent_requests=2).as_service()
    try:
        calls = [service.hold.route(0.2) for _ in range(6)]
        stats_during = None

        async def look():
            nonlocal stats_during
            await asyncio.sleep(0.1)
            stats_during = await service.statistics()

        await asyncio.gather(*calls, look())
        assert await service.peak.route() == 2
        assert stats_during.replicas[0].in_flight == 2
        assert stats_during.replicas[0].queued == 4
    finally:
        await service.shutdown()


async def test_a_replica_that_cannot_be_rebuilt_is_held_out_and_route_fails_clearly(tmp_path):
    marker = tmp_path / "broken"
    service = await Worker.options(
        num_replicas=1, max_restarts=2, restart_cooldown_s=60, unavailable_timeout_s=3
    ).as_service(fail_init_if_exists=str(marker))
    try:
        pid = (await service.whoami.route())["pid"]
        marker.write_text("x")
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="unavailable_timeout_s"):
            await service.whoami.route()
        assert time.monotonic() - started < 10

        async def cooling():
            return (await service.statistics()).replicas[0].state == "cooling_down"

        assert await async_wait_until(cooling, 20, 0.1)
        stats = await service.statistics()
        assert stats.replicas[0].num_restarts == 2  # not a tight loop of rebuilds
        assert "refusing to start" in stats.replicas[0].last_failure
    finally:
        await service.shutdown()


async def test_a_replica_failing_to_start_fails_as_service_with_the_reason(tmp_path):
    marker = tmp_path / "broken"
    marker.write_text("x")
    before = set(monarch_descendants())
    with pytest.raises(ReplicaFailed, match="failed to start"):
        await Worker.options(num_replicas=2).as_service(fail_init_if_exists=str(marker))
    assert await async_wait_until(lambda: set(monarch_descendants()) <= before, 15)


async def test_shutdown_leaves_no_process_behind():
    before = set(monarch_descendants())
    service = await Worker.options(num_replicas=2, procs=2).as_service()
    actor = await Worker.options(procs=2).as_actor()
    assert len(set(monarch_descendants()) - before) >= 7  # controller + 4 replica + 2 actor procs
    await service.shutdown()
    await Worker.shutdown(actor)
    assert await async_wait_until(lambda: set(monarch_descendants()) <= before, 15)
    with pytest.raises(ServiceUnavailable, match="shut down"):
        await service.whoami.route()


class Unsendable:
    def __reduce__(self):
        raise TypeError("cannot pickle this on purpose")


async def test_a_call_that_cannot_be_sent_raises_and_leaves_the_counters_clean():
    service = await Worker.options(num_replicas=2, router="least_loaded").as_service()
    try:
        with pytest.raises(TypeError, match="on purpose"):
            await service.work.route(Unsendable())
        stats = await service.statistics()
        assert all(r.in_flight == 0 and r.queued == 0 for r in stats.replicas)
        assert await service.whoami.rolling() and len(await service.whoami.fanout()) == 2
    finally:
        await service.shutdown()


async def test_a_cancelled_caller_is_not_retried_and_the_replica_is_kept():
    service = await Worker.options(num_replicas=2).as_service()
    try:
        call = asyncio.ensure_future(service.work.route(1, 5.0))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        stats = await service.statistics()
        assert all(r.num_restarts == 0 and r.state == "healthy" for r in stats.replicas)
    finally:
        await service.shutdown()

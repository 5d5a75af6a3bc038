"""Routers choose among healthy replicas without any processes."""


import pytest

from forge.controller import LeastLoadedRouter, ReplicaLoad, RoundRobinRouter, Router, StickyRouter
from forge.controller.service.routers import make_router_factory


def loads(*pairs):
    return [ReplicaLoad(i, in_flight, queued) for i, (in_flight, queued) in enumerate(pairs)]


def test_round_robin_visits_every_replica_in_turn():
    router = RoundRobinRouter()
    replicas = loads((0, 0), (0, 0), (0, 0))
    picks = [router.choose(replicas, None).replica_id for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


def test_least_loaded_prefers_the_idle_replica_counting_queued_calls():
    router = LeastLoadedRouter()
    replicas = loads((3, 0), (1, 2), (1, 0))
    assert router.choose(replicas, None).replica_id == 2


def test_least_loaded_spreads_ties():
    router = LeastLoadedRouter()
    replicas = loads((0, 0), (0, 0))
    assert {router.choose(replicas, None).replica_id for _ in range(4)} == {0, 1}


def test_sticky_router_pins_each_key_and_moves_when_its_replica_leaves():
    router = StickyRouter()

    class Key:  # weak-referenceable, like an asyncio task
        pass

    a, b = Key(), Key()
    replicas = loads((0, 0), (0, 0), (0, 0))
    first_a = router.choose(replicas, a).replica_id
    assert all(router.choose(replicas, a).replica_id == first_a for _ in range(5))
    first_b = router.choose(replicas, b).replica_id
    assert first_b != first_a  # new keys spread least-loaded / in turn
    remaining = [r for r in replicas if r.replica_id != first_a]
    moved = router.choose(remaining, a).replica_id
    assert moved != first_a
    assert router.choose(remaining, a).replica_id == moved


def test_a_user_router_is_a_small_class():
    class AlwaysLast(Router):
        def choose(self, replicas, key):
            return replicas[-1]

    factory = make_router_factory(AlwaysLast)
    assert factory().choose(loads((0, 0), (5, 5)), None).replica_id == 1


def test_router_instances_are_copied_per_process():
    router = RoundRobinRouter()
    factory = make_router_factory(router)
    assert factory() is not router
    assert isinstance(factory(), RoundRobinRouter)


@pytest.mark.parametrize("bad", ["random", 3, object()])
def test_unknown_router_is_a_value_error_listing_the_valid_ones(bad):
    with pytest.raises(ValueError, match="round_robin"):
        make_router_factory(bad)

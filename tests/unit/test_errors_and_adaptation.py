"""Error types and the sync/async endpoint adaptation, checked without processes."""

import inspect
import pickle

from monarch._src.actor.actor_mesh import _actor_kind
from monarch.actor import Actor, endpoint

from forge.controller import EndpointError, ForgeActor, ForgeUsageError, ReplicaFailed


class Mixed(ForgeActor):
    def __init__(self):
        self.value = 0

    @endpoint
    def increment(self) -> int:
        self.value += 1
        return self.value

    @endpoint
    async def reset(self):
        self.value = 0


def test_a_forge_actor_may_mix_sync_and_async_endpoints():
    _actor_kind(Mixed)  # Monarch's own check: raises ValueError for a mix
    assert inspect.iscoroutinefunction(Mixed.increment._method)
    assert Mixed.increment._method.__name__ == "increment"


def test_a_plain_monarch_actor_is_left_alone():
    class PlainMixed(Actor):
        @endpoint
        def a(self):
            return 1

        @endpoint
        async def b(self):
            return 2

    assert not inspect.iscoroutinefunction(PlainMixed.a._method)


def test_sync_endpoints_run_to_completion_with_the_actor_state():
    import asyncio

    actor = Mixed()
    assert asyncio.run(Mixed.increment._method(actor)) == 1
    assert asyncio.run(Mixed.increment._method(actor)) == 2


def test_an_all_sync_actor_stays_sync_and_gets_a_sync_probe():
    class AllSync(ForgeActor):
        @endpoint
        def a(self):
            return 1

    assert not inspect.iscoroutinefunction(AllSync.a._method)
    assert not inspect.iscoroutinefunction(AllSync._forge_ping._method)
    _actor_kind(AllSync)


def test_endpoint_error_carries_type_message_and_remote_traceback_and_pickles():
    error = EndpointError("Counter.boom", KeyError("k"), "builtins.KeyError", "'k'", "Traceback ...", 2)
    text = str(error)
    assert "Counter.boom" in text and "builtins.KeyError" in text and "replica 2" in text
    assert "Traceback ..." in text
    copy = pickle.loads(pickle.dumps(error))
    assert copy.original_type == "builtins.KeyError" and copy.replica_id == 2
    assert isinstance(copy.original, KeyError)


def test_replica_failed_pickles_with_its_replica():
    copy = pickle.loads(pickle.dumps(ReplicaFailed("gone", 3)))
    assert copy.replica_id == 3 and "gone" in str(copy)


def test_usage_errors_are_type_errors():
    assert issubclass(ForgeUsageError, TypeError)

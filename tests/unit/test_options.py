"""ForgeActor.options validates everything before anything is spawned."""

import pytest
from monarch.actor import endpoint

from forge.controller import ForgeActor


class Plain(ForgeActor):
    @endpoint
    async def ping(self) -> str:
        return "pong"


def test_options_returns_a_configured_copy_and_leaves_the_class_alone():
    configured = Plain.options(procs=2, num_replicas=3, router="least_loaded")
    assert configured is not Plain
    assert issubclass(configured, Plain)
    assert configured._forge_placement.procs == 2
    assert configured._forge_placement.num_replicas == 3
    assert Plain._forge_placement.procs == 1
    assert configured.__name__ == "Plain"


def test_options_of_options_start_from_the_defaults():
    twice = Plain.options(num_replicas=4).options(procs=2)
    assert twice._forge_placement.num_replicas == 1
    assert twice._forge_placement.procs == 2
    assert twice._forge_base is Plain


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"replicas": 2}, "replicas"),
        ({"procs": 0}, "procs"),
        ({"procs": "2"}, "procs"),
        ({"num_replicas": -1}, "num_replicas"),
        ({"with_gpus": "yes"}, "with_gpus"),
        ({"hosts": 0}, "hosts"),
        ({"host_group": ""}, "host_group"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"health_probe_timeout_s": -1}, "health_probe_timeout_s"),
        ({"unavailable_timeout_s": "soon"}, "unavailable_timeout_s"),
        ({"router": "fastest"}, "router"),
        ({"fanout_partial": 1}, "fanout_partial"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_options_are_value_errors_naming_the_option(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Plain.options(**kwargs)


def test_unknown_option_error_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        Plain.options(num_replica=2)
    assert "num_replica" in str(info.value)
    assert "num_replicas" in str(info.value) and "router" in str(info.value)


async def test_as_actor_with_replicas_is_refused_before_spawning():
    with pytest.raises(ValueError, match="as_service"):
        await Plain.options(num_replicas=2).as_actor()


async def test_asking_for_more_gpus_than_exist_fails_before_spawning(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="needs 3 GPU"):
        await Plain.options(num_replicas=3, with_gpus=True).as_service()
    with pytest.raises(ValueError, match="2 visible GPU"):
        await Plain.options(procs=4, with_gpus=True).as_actor()


def test_endpoint_names_a_service_handle_uses_are_refused():
    class Clashing(ForgeActor):
        @endpoint
        async def shutdown(self):
            return None

    import asyncio

    with pytest.raises(ValueError, match="rename"):
        asyncio.run(Clashing.options(num_replicas=1).as_service())

"""A client process for the crash tests: starts a service and an actor, then waits to be killed."""

import asyncio
import sys

from forge.util.tmpdirs import private_tmpdir
from tests.actors.service_actors import Worker


async def main() -> None:
    private_tmpdir()  # as an application's entry point would
    service = await Worker.options(num_replicas=2).as_service()
    actor = await Worker.as_actor()
    await service.whoami.route()
    await actor.whoami.call_one()
    print("READY", flush=True)
    try:
        while True:
            await service.whoami.route()
            await asyncio.sleep(0.05)
    finally:
        await asyncio.gather(service.shutdown(), Worker.shutdown(actor))
        print("CLEAN", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)

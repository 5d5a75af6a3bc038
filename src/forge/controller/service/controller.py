"""The service controller: one actor per service that owns its replicas' lifecycle.

It runs in a process of its own, spawned with Monarch's supervision poll tuned to one
second, and it owns every replica's ProcMesh, so a dead replica process reaches its
``__supervise__`` within about a second. It also probes every replica on a timer (a
replica silent for ``health_probe_timeout_s`` is hung), rebuilds failed replicas in the
background with the same constructor arguments and ``setup`` (then the latest fanout of
each ``@replay_on_rebuild`` endpoint, e.g. the current weights), and holds a replica that
keeps failing out for a cool-down (circuit breaker).

Handles never send requests through the controller: they call replicas directly and
only poll the controller for membership changes (``membership_since``), so the controller is not on
the hot path.

A controller that dies is replaced by the process that created the service (see
``ServiceClient``): the replacement (the next *incarnation*) is started with the last
membership that process saw and **adopts** those replicas, which kept serving
meanwhile. Monarch lets only a mesh's owner stop it or hear of its death, so an adopted
replica is watched by its pids (locally, or through the host registry) and stopped by
killing them; every replica rebuilt from then on is owned again. Processes the dead
controller was starting (a rebuild in progress) are found by their ``FORGE_SERVICE_ID``
and killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from monarch.actor import Actor, endpoint, this_host

from forge.controller.endpoints import CONTROLLER, PING, start_mesh
from forge.controller.errors import ReplicaFailed
from forge.controller.hosts import (
    HostRequest,
    Placement,
    place,
    placement_alive,
    release_placement,
    spawn_placed,
    wait_for_returns,
)
from forge.controller.options import PlacementOptions, ServiceOptions
from forge.controller.provisioner import rank_env, spawn_proc_mesh, stop_quietly
from forge.controller.service.types import Membership, ReplayedCall, ReplicaHealth, ReplicaRef, ReplicaState
from forge.util.procs import has_env, kill_tagged, processes_with_env
from forge.util.tasks import Nursery

logger = logging.getLogger("forge.service")

_STOP_TIMEOUT_S = 15.0
SERVICE_ID_ENV = "FORGE_SERVICE_ID"  # on every replica process of a service
CONTROLLER_OF_ENV = "FORGE_CONTROLLER_OF"  # on a service's controller process


@dataclass(frozen=True)
class ServiceSpec:
    """Everything needed to (re)build any replica of a service."""

    name: str
    actor_class: type
    args: tuple
    kwargs: dict
    placement: PlacementOptions
    options: ServiceOptions
    gpus_per_replica: tuple[tuple[str, ...], ...] | None
    has_setup: bool
    hosts: HostRequest | None = None  # replicas go on the host pool, not the controller's host
    service_id: str = ""  # unique per service; every replica process carries it as FORGE_SERVICE_ID


@dataclass
class _Replica:
    replica_id: int
    state: ReplicaState = ReplicaState.STARTING
    generation: int = 0
    incarnation: int = 0  # of the controller that spawned the current processes
    is_adopted: bool = False  # spawned by a previous controller: watched and stopped by pid
    proc_mesh: Any = None
    actors: Any = None
    pids: tuple[int, ...] = ()
    placement: Placement | None = None
    restart_times: list[float] = field(default_factory=list)
    num_restarts: int = 0
    last_failure: str | None = None
    is_probing: bool = False

    def mesh_prefix(self, service: str) -> str:
        return f"{service}_r{self.replica_id}_i{self.incarnation}_g{self.generation}"


def short_reason(text: str) -> str:
    """One line out of Monarch's multi-line supervision messages."""
    marker = "the process this actor was running on failed"
    if marker in text:
        return "process died: " + text[text.index(marker) + len(marker):].splitlines()[0].strip(" :")
    first = " ".join(text.split())
    return first[:200] + ("..." if len(first) > 200 else "")


class ServiceController(Actor):
    """Owns the replicas of one service. Endpoints are called by Forge, not by users."""

    def __init__(self, spec: ServiceSpec, incarnation: int = 0) -> None:
        self._spec = spec
        self._incarnation = incarnation
        self._replicas = [_Replica(i, incarnation=incarnation) for i in range(spec.placement.num_replicas)]
        self._epoch = 0
        self._self_ref: Any = None  # this controller's ActorMesh, which replicas hand to handles
        self._tasks = Nursery(f"service {spec.name!r} controller")
        self._is_shut_down = False
        self._last_host_death: float | None = None
        self._replays: dict[str, ReplayedCall] = {}  # endpoint -> its latest fanout, for rebuilt replicas

    # ---- endpoints -------------------------------------------------------------

    @endpoint
    async def start(self, self_ref: Any = None, adopted: Membership | None = None,
                    replays: tuple[ReplayedCall, ...] = ()) -> Membership:
        """Spawn every replica (if any fails to start, stop them all and raise), or, as the
        replacement of a dead controller, adopt the replicas of ``adopted`` and rebuild the rest."""
        self._self_ref = self_ref
        for call in replays:
            self._replays[call.method] = call
        if adopted is not None:
            await self._adopt(adopted)
        else:
            await self._start_all()
        self._own(self._probe_loop())
        self._bump()
        return self._membership()

    async def _start_all(self) -> None:
        results = await asyncio.gather(
            *(self._spawn(r) for r in self._replicas), return_exceptions=True
        )
        errors = [(r, e) for r, e in zip(self._replicas, results) if isinstance(e, BaseException)]
        if errors:
            await self._stop_all()
            replica, error = errors[0]
            raise ReplicaFailed(
                str(error) if isinstance(error, ReplicaFailed)  # already names the service and replica
                else f"service {self._spec.name!r}: replica {replica.replica_id} failed to start: {error}",
                replica.replica_id,
            )

    async def _adopt(self, adopted: Membership) -> None:
        """Take over the replicas a dead controller left serving; rebuild the others."""
        refs = {ref.replica_id: ref for ref in adopted.replicas}
        for replica in self._replicas:
            ref = refs.get(replica.replica_id)
            if ref is None or not ref.pids:
                continue
            replica.actors, replica.pids, replica.placement = ref.actors, ref.pids, ref.placement
            replica.generation, replica.incarnation, replica.num_restarts = ref.generation, ref.incarnation, ref.num_restarts
            replica.state, replica.is_adopted = ReplicaState.HEALTHY, True
        kept = {pid for r in self._replicas if r.is_adopted for pid in r.pids}
        starting = [p for p in processes_with_env(SERVICE_ID_ENV, self._spec.service_id) if p not in kept]
        kill_tagged(starting, SERVICE_ID_ENV, self._spec.service_id)  # replicas the dead controller was starting
        # In the background: a replica busy with a long call answers only after it.
        self._own(self._announce([r for r in self._replicas if r.is_adopted]))
        for replica in self._replicas:
            if not replica.is_adopted:
                replica.generation = 0
                self._fail(replica, "was not serving when the previous controller died")
        logger.warning("service %s: controller %d took over %d replica(s)", self._spec.name, self._incarnation,
                       len([r for r in self._replicas if r.is_adopted]))

    async def _announce(self, replicas: list[_Replica]) -> None:
        """Tell replicas which controller is theirs now; handles in other processes ask them."""
        if self._self_ref is None:
            return
        calls = [asyncio.wait_for(getattr(r.actors, CONTROLLER).call((self._incarnation, self._self_ref)),
                                   _STOP_TIMEOUT_S)
                 for r in replicas]
        for replica, result in zip(replicas, await asyncio.gather(*calls, return_exceptions=True)):
            if isinstance(result, BaseException):  # a dead or busy replica: the probes deal with it
                logger.info("service %s: replica %d did not take the new controller: %r",
                            self._spec.name, replica.replica_id, result)

    @endpoint
    async def membership_since(self, known: tuple[int, int]) -> Membership | None:
        """The membership if it changed since version ``known`` (incarnation, epoch), else ``None``."""
        if tuple(known) == (self._incarnation, self._epoch):
            return None
        return self._membership()

    @endpoint
    async def report_failure(self, replica_id: int, incarnation: int, generation: int, reason: str) -> None:
        """A handle saw an infrastructure error from a replica: take it out and rebuild it."""
        replica = self._replicas[replica_id]
        if (replica.incarnation, replica.generation) == (incarnation, generation) and replica.state == ReplicaState.HEALTHY:
            self._fail(replica, f"reported by a caller: {reason}")

    @endpoint
    async def remember(self, call: ReplayedCall) -> None:
        """The latest fanout of a ``@replay_on_rebuild`` endpoint: rebuilt replicas get it first."""
        self._replays.pop(call.method, None)
        self._replays[call.method] = call  # replayed in the order the endpoints were last called

    @endpoint
    async def health(self) -> list[ReplicaHealth]:
        return [
            ReplicaHealth(
                r.replica_id, r.state, r.generation, r.num_restarts, r.last_failure, r.pids,
                r.placement.host_keys if r.placement is not None else (),
            )
            for r in self._replicas
        ]

    @endpoint
    async def shutdown_service(self) -> None:
        self._is_shut_down = True
        if self._spec.hosts is not None:  # meshes on a dead host stop first (see drain_s)
            await wait_for_returns(self._last_host_death, self._spec.hosts.failure_timeout_s)
        await self._tasks.close()
        await self._stop_all()
        self._bump()

    def _handle_undeliverable_message(self, message: Any) -> bool:
        """A reply to a caller that has gone away (e.g. a stopped actor's watch): drop it."""
        return True

    def __supervise__(self, failure: Any) -> bool:
        """A replica's process died: take the replica out and rebuild it. Always handled."""
        mesh_name = str(getattr(failure, "mesh_name", ""))
        for replica in self._replicas:
            if replica.state == ReplicaState.HEALTHY and mesh_name.startswith(
                replica.mesh_prefix(self._spec.name)
            ):
                self._fail(replica, str(failure))
        return True

    # ---- replica lifecycle -----------------------------------------------------

    async def _spawn(self, replica: _Replica) -> None:
        spec = self._spec
        num_procs = spec.placement.procs
        replica.incarnation, replica.is_adopted = self._incarnation, False
        tag = {"FORGE_REPLICA_ID": str(replica.replica_id), SERVICE_ID_ENV: spec.service_id}
        prefix = replica.mesh_prefix(spec.name)
        if spec.hosts is not None:
            replica.placement = await place(spec.hosts, f"service {spec.name!r} replica {replica.replica_id}")
            replica.proc_mesh = spawn_placed(spec.hosts, replica.placement, f"{prefix}_procs", tag)
        else:
            gpus = list(spec.gpus_per_replica[replica.replica_id]) if spec.gpus_per_replica else None
            envs = rank_env(num_procs, gpus, tag)
            replica.proc_mesh = spawn_proc_mesh(this_host(), num_procs, envs, name=f"{prefix}_procs")
        replica.actors = replica.proc_mesh.spawn(prefix, spec.actor_class, *spec.args, **spec.kwargs)

        async def tell_controller() -> None:
            if self._self_ref is not None:
                await getattr(replica.actors, CONTROLLER).call((self._incarnation, self._self_ref))

        async def catch_up() -> None:  # with the replicas that kept running
            for call in list(self._replays.values()):
                args, kwargs = call.arguments()
                await getattr(replica.actors, call.method).call(*args, **kwargs)

        replica.pids = await start_mesh(replica.actors, spec.has_setup, spec.options.spawn_timeout_s,
                                        f"service {spec.name!r} replica {replica.replica_id}",
                                        prepare=tell_controller, catch_up=catch_up)
        replica.state = ReplicaState.HEALTHY

    def _fail(self, replica: _Replica, reason: str) -> None:
        reason = short_reason(reason)
        logger.warning("service %s: replica %d failed (%s); rebuilding it", self._spec.name, replica.replica_id, reason)
        replica.state = ReplicaState.FAILED
        replica.last_failure = reason
        self._bump()
        if not self._is_shut_down:
            self._own(self._recover(replica))

    async def _recover(self, replica: _Replica) -> None:
        """Stop the failed replica and rebuild it, with a cool-down when it keeps failing."""
        options = self._spec.options
        await self._stop_replica(replica)
        while not self._is_shut_down:
            now = time.monotonic()
            replica.restart_times = [t for t in replica.restart_times if now - t < options.restart_window_s]
            if len(replica.restart_times) >= options.max_restarts:
                replica.state = ReplicaState.COOLING_DOWN
                logger.warning(
                    "service %s: replica %d failed %d times in %.0f s; holding it out for %.0f s",
                    self._spec.name, replica.replica_id, len(replica.restart_times),
                    options.restart_window_s, options.restart_cooldown_s,
                )
                await asyncio.sleep(options.restart_cooldown_s)
                replica.restart_times.clear()
            replica.restart_times.append(time.monotonic())
            replica.state = ReplicaState.REBUILDING
            replica.generation += 1
            replica.num_restarts += 1
            try:
                await self._spawn(replica)
            except Exception as e:  # a rebuild that fails is retried after the breaker's rules
                replica.last_failure = f"rebuild failed: {e}"
                logger.warning("service %s: rebuilding replica %d failed: %s", self._spec.name, replica.replica_id, e)
                await self._stop_replica(replica)
                continue
            logger.info("service %s: replica %d is back (generation %d)", self._spec.name, replica.replica_id, replica.generation)
            self._bump()
            return

    async def _stop_replica(self, replica: _Replica) -> None:
        """Stop a replica's processes; kill them outright if Monarch cannot stop them in time."""
        mesh, pids, placement = replica.proc_mesh, replica.pids, replica.placement
        if placement is not None and not await placement_alive(self._spec.hosts, placement, timeout_s=10):
            # A host of it is gone, and its processes with it: kill the ranks left on live hosts,
            # free the placement, rebuild now; stop the mesh once Monarch has returned what was
            # sent to the dead host (see drain_s).
            replica.proc_mesh, replica.actors, replica.pids, replica.placement = None, None, (), None
            self._last_host_death = time.monotonic()
            await release_placement(self._spec.hosts, placement, pids)
            if mesh is not None:
                self._own(self._stop_after_returns(mesh, self._last_host_death))
            return
        replica.proc_mesh, replica.actors, replica.pids, replica.placement = None, None, (), None
        stopped = False  # an adopted replica has no mesh of ours to stop: its pids are killed
        try:
            if mesh is not None:
                await asyncio.wait_for(mesh.stop(), _STOP_TIMEOUT_S)
                stopped = True
        except Exception as e:  # a broken or hung mesh: make sure its processes are gone
            logger.info("service %s: stopping replica %d: %s; killing its processes", self._spec.name, replica.replica_id, e)
        finally:  # also when this task is cancelled (shutdown): never leave a hung replica running
            if placement is not None:
                await release_placement(self._spec.hosts, placement, () if stopped else pids)
            else:
                kill_tagged(pids, SERVICE_ID_ENV, self._spec.service_id)

    async def _stop_after_returns(self, mesh: Any, host_death: float) -> None:
        await wait_for_returns(host_death, self._spec.hosts.failure_timeout_s)
        await stop_quietly(mesh, _STOP_TIMEOUT_S)

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop_replica(r) for r in self._replicas), return_exceptions=True)
        for replica in self._replicas:
            replica.state = ReplicaState.STOPPED

    # ---- health probes ---------------------------------------------------------

    async def _probe_loop(self) -> None:
        options = self._spec.options
        while not self._is_shut_down:
            await asyncio.sleep(options.health_probe_interval_s)
            for replica in self._replicas:
                if replica.state != ReplicaState.HEALTHY:
                    continue
                if replica.is_adopted:  # Monarch tells only a mesh's owner of its death
                    self._own(self._check_adopted(replica))
                if not replica.is_probing:
                    replica.is_probing = True
                    self._own(self._probe(replica))

    async def _check_adopted(self, replica: _Replica) -> None:
        generation, pids = replica.generation, replica.pids
        if replica.placement is None:  # a pid alone may have been reused: check it is still this service's
            alive = all(has_env(pid, SERVICE_ID_ENV, self._spec.service_id) for pid in pids)
        else:
            try:
                alive = await asyncio.wait_for(
                    self._spec.hosts.registry.alive.call_one(replica.placement, list(pids)), _STOP_TIMEOUT_S)
            except Exception as e:  # the registry is gone or slow: the health probe still runs
                logger.info("service %s: checking adopted replica %d: %r", self._spec.name, replica.replica_id, e)
                return
        if not alive and replica.generation == generation and replica.state == ReplicaState.HEALTHY:
            self._fail(replica, "process died (found by pid; the replica was adopted from a previous controller)")

    async def _probe(self, replica: _Replica) -> None:
        generation, actors = replica.generation, replica.actors
        try:
            await asyncio.wait_for(getattr(actors, PING).call(), self._spec.options.health_probe_timeout_s)
        except asyncio.TimeoutError:
            if replica.generation == generation and replica.state == ReplicaState.HEALTHY:
                self._fail(replica, f"hung: no answer to a health probe in {self._spec.options.health_probe_timeout_s} s")
        except Exception as e:  # SupervisionError and friends: the process is gone
            if replica.generation == generation and replica.state == ReplicaState.HEALTHY:
                self._fail(replica, f"health probe failed: {e}")
        finally:
            replica.is_probing = False

    # ---- membership ------------------------------------------------------------

    def _membership(self) -> Membership:
        healthy = tuple(
            ReplicaRef(r.replica_id, r.generation, r.actors, self._spec.placement.procs, r.incarnation, r.pids,
                       r.placement, r.num_restarts)
            for r in self._replicas
            if r.state == ReplicaState.HEALTHY
        )
        return Membership(self._epoch, healthy, self._is_shut_down, self._incarnation, os.getpid())

    def _bump(self) -> None:
        self._epoch += 1

    def _own(self, coro: Any) -> None:
        self._tasks.start(coro)

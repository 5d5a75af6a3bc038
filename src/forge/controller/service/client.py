"""The calling side of a service: replica choice, queueing, retries and failover.

One ``ServiceClient`` exists per service per event loop in each process that uses a
handle; every copy of the handle there shares it. It keeps the membership it learns
from the controller (a polling task it owns), a slot per healthy replica
with its concurrency limit and counters, and the sessions of the tasks in it.

A request goes straight from here to the chosen replica (one Monarch hop). When that
replica's process dies, the call fails with a supervision error or is cancelled as soon
as the membership says the replica is gone, and it is sent again to another replica.

When the controller dies, calls go on to the replicas this client knows. In the process
that created the service, the client finds the death within one poll (it checks the
controller's pid) and has a new controller started that adopts the replicas. Elsewhere
(a handle passed to another actor) it asks the replicas which controller they now
answer to. If no controller is back within ``_CONTROLLER_RECOVERY_S`` the service is
unavailable: calls in flight are cancelled and every call raises ``ServiceUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from monarch.actor import ActorError

from forge.controller.endpoints import CONTROLLER
from forge.controller.errors import EndpointError, ReplicaFailed, ServiceUnavailable, is_infrastructure_error
from forge.controller.options import ServiceOptions
from forge.controller.service.routers import ReplicaLoad
from forge.controller.service.slots import Slot
from forge.controller.service.types import Membership, ReplayedCall, ReplicaFailure, ReplicaRef
from forge.util.tasks import Nursery

logger = logging.getLogger("forge.service")

_WATCH_TIMEOUT_S = 5.0  # bound on one membership poll or failure report
_WATCH_INTERVAL_S = 0.2  # how often a client polls the controller for membership changes
_WATCH_MAX_FAILURES = 6  # consecutive timed-out polls (about 30 s) before the controller counts as gone
_CONTROLLER_RECOVERY_S = 60.0  # bound on finding or starting a replacement controller
_ASK_TIMEOUT_S = 2.0  # bound on asking one replica for its controller


class _ControllerGone(Exception):
    """Internal: the controller's process is gone (seen by its pid in the creating process)."""


class _ReplicaGone(Exception):
    """Internal: the replica a call was sent to died or left the service.

    ``was_running`` is true when the call had reached the replica (it died or hung while
    running it), false when the replica was gone before the call was sent.
    """

    def __init__(self, replica_id: int, reason: str, was_running: bool = True) -> None:
        super().__init__(reason)
        self.replica_id = replica_id
        self.reason = reason
        self.was_running = was_running


def endpoint_error(actor_error: ActorError, endpoint: str, replica_id: int | None) -> EndpointError:
    """Turn Monarch's ``ActorError`` into Forge's ``EndpointError``, keeping the remote traceback."""
    original = getattr(actor_error, "exception", None)
    type_name = (
        f"{type(original).__module__}.{type(original).__qualname__}" if original is not None else "Exception"
    )
    message = str(original) if original is not None else str(actor_error)
    remote_tb = str(getattr(actor_error, "exception_formatted", "") or actor_error)
    return EndpointError(endpoint, original, type_name, message, remote_tb, replica_id)


@dataclass
class _Session:
    slot: Slot | None = None


async def _await_monarch(future: Any) -> Any:
    return await future


class ServiceClient:
    """Routes calls of one service from one process (see the module docstring)."""

    def __init__(self, name: str, controller: Any, options: ServiceOptions, membership: Membership,
                 replayed: tuple[str, ...] = ()) -> None:
        self.name = name
        self._replayed = replayed
        self._controller = controller
        self._options = options
        self._router = options.router_factory()
        self._slots: dict[int, Slot] = {}
        self._retired: dict[int, Slot] = {}  # last slot of replicas that left, for statistics
        self._healthy_loads: list[ReplicaLoad] = []
        self._version = (-1, -1)  # (incarnation, epoch) of the membership applied last
        self._owner: Any = None  # in the creating process: replaces a dead controller
        self._recovery = asyncio.Lock()
        self._replays: dict[str, ReplayedCall] = {}  # latest @replay_on_rebuild calls made from here
        self._changed: asyncio.Future | None = None
        self._sessions: "weakref.WeakKeyDictionary[asyncio.Task, list[_Session]]" = weakref.WeakKeyDictionary()
        self._watcher: asyncio.Task | None = None
        self._background = Nursery(f"service {name!r} client")  # failure reports
        self._broken: str | None = None
        self._dropped: set[tuple[int, int, int]] = set()  # ReplicaRef.key of replicas this process saw fail
        self._excluded: set[int] = set()  # replicas rolling() holds out of routing
        self.membership = membership
        self.apply(membership)

    # ---- membership ------------------------------------------------------------

    def apply(self, membership: Membership) -> None:
        if membership.version <= self._version:
            return
        self._version = membership.version
        self.membership = membership
        if membership.is_shut_down:
            self._broken = f"service {self.name!r} has been shut down"
        new_slots: dict[int, Slot] = {}
        for ref in membership.replicas:
            if ref.key in self._dropped:
                continue  # this process saw it fail; the controller's answer predates our report
            old = self._slots.get(ref.replica_id)
            if old is not None and old.ref.key == ref.key and not old.is_gone:
                new_slots[ref.replica_id] = old
            else:
                history = old or self._retired.get(ref.replica_id)
                new_slots[ref.replica_id] = Slot(ref, self._options.max_concurrent_requests, history)
        for replica_id, old in self._slots.items():
            if new_slots.get(replica_id) is not old:
                old.leave()
                self._retired[replica_id] = old
        self._slots = new_slots
        self._refresh_loads()
        self._notify()

    def _refresh_loads(self) -> None:
        """The loads the router chooses from: healthy replicas not held out by rolling()."""
        self._healthy_loads = [
            s.load for s in sorted(self._slots.values(), key=lambda s: s.ref.replica_id)
            if s.ref.replica_id not in self._excluded
        ]

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def _drop_slot(self, slot: Slot, reason: str) -> None:
        """This process saw the replica fail: stop using it and tell the controller."""
        self._dropped.add(slot.ref.key)
        if self._slots.get(slot.ref.replica_id) is slot:
            del self._slots[slot.ref.replica_id]
            self._retired[slot.ref.replica_id] = slot
            self._refresh_loads()
        if not slot.is_gone:
            slot.leave()
            self._spawn(self._report(slot.ref, reason))

    async def _report(self, ref: ReplicaRef, reason: str) -> None:
        try:
            await asyncio.wait_for(
                _await_monarch(self._controller.report_failure.choose(ref.replica_id, ref.incarnation, ref.generation,
                                                                      reason)),
                _WATCH_TIMEOUT_S,
            )
        except Exception as e:  # the controller finds dead replicas itself too; log and go on
            logger.info("service %s: could not report replica %d failure: %s", self.name, ref.replica_id, e)

    def _ensure_watcher(self) -> None:
        if self._watcher is None and self._broken is None:
            self._watcher = asyncio.ensure_future(self._watch())

    @property
    def controller(self) -> Any:
        """The service's current controller (a replacement after the first one died)."""
        return self._controller

    async def ask_controller(self, endpoint: str, *args: Any, timeout_s: float) -> Any:
        """Call one of the controller's endpoints. A dead controller is replaced first (in the
        creating process); a call that finds it dead is made once more, to the replacement."""
        await self.ensure_controller()
        controller = self._controller
        try:
            return await self._ask(controller, endpoint, args, timeout_s)
        except Exception as e:
            if not is_infrastructure_error(e) or not await self._recover_controller(e, controller):
                raise
        return await self._ask(self._controller, endpoint, args, timeout_s)

    async def _ask(self, controller: Any, endpoint: str, args: tuple, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(_await_monarch(getattr(controller, endpoint).choose(*args)), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"service {self.name!r}: its controller did not answer {endpoint}() within "
                               f"{timeout_s:.0f} s") from None

    async def ensure_controller(self) -> None:
        """In the creating process: replace the controller now if its process is gone."""
        if self._owner is not None and self._broken is None and not self._owner.controller_alive():
            gone = _ControllerGone(f"its process (pid {self._owner.controller_pid}) is gone")
            await self._recover_controller(gone, self._controller)

    def watch_as_owner(self, owner: Any) -> None:
        """This is the creating process: watch the controller from now on and replace it if it dies."""
        self._owner = owner
        self._ensure_watcher()

    async def _poll(self, controller: Any = None) -> None:
        """Ask the controller (default: the current one) once for membership changes.
        Raises if it is unreachable."""
        controller = controller if controller is not None else self._controller
        if self._owner is not None and not self._owner.controller_alive():
            raise _ControllerGone(f"its process (pid {self._owner.controller_pid}) is gone")
        membership = await asyncio.wait_for(
            _await_monarch(controller.membership_since.choose(self._version)), _WATCH_TIMEOUT_S
        )
        if membership is not None:
            self.apply(membership)

    async def _refresh(self) -> None:
        """The latest membership if the controller answers; else the known one (the watcher
        is replacing the controller meanwhile)."""
        if self._broken is not None:
            return
        try:
            await self._poll()
        except Exception as e:  # a dead or slow controller: go on with what this process knows
            logger.info("service %s: membership poll failed (%r); using the known replicas", self.name, e)
            self._ensure_watcher()

    async def _watch(self) -> None:
        failures = 0
        while self._broken is None:
            controller = self._controller
            try:
                await self._poll(controller)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a slow answer is retried; a dead controller is replaced
                failures += 1
                if isinstance(e, _ControllerGone) or is_infrastructure_error(e) or failures >= _WATCH_MAX_FAILURES:
                    if not await self._recover_controller(e, controller):
                        return
                    failures = 0
                    continue
                logger.info("service %s: membership poll failed (%r); retrying", self.name, e)
                try:
                    if await self._adopt_newer_controller():
                        failures = 0
                except Exception as ask_error:  # the next poll, or the recovery after it, decides
                    logger.info("service %s: asking the replicas for a newer controller: %r", self.name, ask_error)
            await asyncio.sleep(_WATCH_INTERVAL_S)

    async def _recover_controller(self, error: BaseException, failed: Any) -> bool:
        """Get a working controller after ``error`` from controller ``failed``; whether one is
        back (else the service is unavailable). Only ``failed`` is ever replaced: an error
        seen on a controller that has been replaced meanwhile needs nothing more."""
        async with self._recovery:  # the watcher and shutdown() may both find the controller gone
            if self._controller is not failed or self._broken is not None:
                return self._broken is None
            return await self._replace_controller(error)

    async def _replace_controller(self, error: BaseException) -> bool:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        try:
            if self._owner is not None:
                controller, membership = await asyncio.wait_for(
                    self._owner.replace_controller(self.membership, tuple(self._replays.values())),
                    _CONTROLLER_RECOVERY_S)
            else:
                controller = await self._find_controller(time.monotonic() + _CONTROLLER_RECOVERY_S)
                membership = await asyncio.wait_for(
                    _await_monarch(controller.membership_since.choose((-1, -1))), _WATCH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure here leaves the service without a controller
            self._broken = (f"service {self.name!r}: its controller failed ({reason}) and no replacement was "
                            f"running within {_CONTROLLER_RECOVERY_S:.0f} s ({e!r})")
            logger.warning("%s", self._broken)
            self._abandon()
            return False
        self._controller = controller
        self.apply(membership)
        return True

    async def _find_controller(self, deadline: float) -> Any:
        """Ask the replicas this process knows which controller they answer to now, until one
        names a newer controller than ours."""
        while time.monotonic() < deadline:
            controller = await self._newer_controller()
            if controller is not None:
                return controller
            await asyncio.sleep(_WATCH_INTERVAL_S)
        raise TimeoutError("no replica named a newer controller")

    async def _newer_controller(self) -> Any:
        """One round of asking the known replicas; a controller newer than ours, or None."""
        answers = await asyncio.gather(*(
            asyncio.wait_for(_await_monarch(getattr(slot.ref.actors, CONTROLLER).choose()), _ASK_TIMEOUT_S)
            for slot in list(self._slots.values())), return_exceptions=True)
        newer = [a for a in answers if isinstance(a, tuple) and a[0] > self._version[0]]
        return max(newer, key=lambda a: a[0])[1] if newer else None

    async def _adopt_newer_controller(self) -> bool:
        """In a process that did not create the service: a poll went unanswered, so ask the
        replicas whether a replacement controller took over (whether we switched to it)."""
        if self._owner is not None:
            return False
        controller = await self._newer_controller()
        if controller is None:
            return False
        membership = await asyncio.wait_for(
            _await_monarch(controller.membership_since.choose((-1, -1))), _WATCH_TIMEOUT_S)
        self._controller = controller
        self.apply(membership)
        return True

    def _abandon(self) -> None:
        """No controller: cancel the calls in flight (they fail over to ServiceUnavailable)."""
        for slot in self._slots.values():
            self._retired[slot.ref.replica_id] = slot
            slot.leave()
        self._slots = {}
        self._refresh_loads()
        self._notify()

    def _spawn(self, coro: Any) -> None:
        self._background.start(coro)

    async def close(self) -> None:
        """Cancel this client's background tasks (watcher and failure reports)."""
        self._broken = self._broken or f"service {self.name!r} has been shut down"
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._background.close()
        self._notify()

    # ---- choosing a replica ----------------------------------------------------

    async def _wait_for_change(self, deadline: float) -> None:
        self._ensure_watcher()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceUnavailable(
                f"service {self.name!r}: no healthy replica within {self._options.unavailable_timeout_s} s "
                "(unavailable_timeout_s); see service.statistics() for replica states"
            )
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), remaining)
        except asyncio.TimeoutError:
            pass

    async def _pick(self, session: _Session | None) -> Slot:
        deadline: float | None = None
        while True:
            if self._broken is not None:
                raise ServiceUnavailable(self._broken)
            if self._healthy_loads:
                pinned = session.slot if session is not None else None
                if pinned is not None and not pinned.is_gone and pinned.ref.replica_id not in self._excluded:
                    return pinned
                load = self._router.choose(self._healthy_loads, asyncio.current_task())
                slot = self._slots[load.replica_id]
                if session is not None:
                    session.slot = slot
                return slot
            if deadline is None:
                deadline = time.monotonic() + self._options.unavailable_timeout_s
            await self._wait_for_change(deadline)

    # ---- calls -----------------------------------------------------------------

    async def _call(self, slot: Slot, method: str, args: tuple, kwargs: dict, all_ranks: bool) -> Any:
        """One call to one replica. Raises ``_ReplicaGone`` for infrastructure failures."""
        if slot.free_capacity > 0 and not slot.waiters:
            slot.free_capacity -= 1  # fast path: no coroutine, no future
        else:
            await slot.wait_for_capacity()
        try:
            if slot.is_gone:
                raise _ReplicaGone(slot.ref.replica_id, "replica left the service", was_running=False)
            started = time.perf_counter()
            caller = asyncio.current_task()
            slot.begin_call(caller)
            try:
                endpoint = slot.endpoint(method)
                if slot.ref.num_procs == 1:
                    result = await endpoint.choose(*args, **kwargs)
                else:
                    result = await endpoint.call(*args, **kwargs)
            except asyncio.CancelledError:
                was_evicted = caller in slot.evicted  # cancelled by leave(), not by the caller's owner
                slot.evicted.discard(caller)
                if hasattr(caller, "cancelling"):  # Python >= 3.11 counts cancellations
                    if was_evicted:
                        caller.uncancel()
                    if caller.cancelling() > 0:
                        raise  # the caller itself is being cancelled
                elif not was_evicted:
                    raise  # Python 3.10 cannot tell a runtime cancellation from the caller's own
                # Left the service, or Monarch dropped the reply of a dying process.
                slot.failed += 1
                self._drop_slot(slot, "the call was cancelled by the runtime (process gone)")
                raise _ReplicaGone(slot.ref.replica_id, "replica left the service") from None
            except ActorError as e:
                slot.failed += 1
                raise endpoint_error(e, f"{method}", slot.ref.replica_id) from None
            except Exception as e:
                if not is_infrastructure_error(e):
                    raise
                slot.failed += 1
                self._drop_slot(slot, str(e))
                raise _ReplicaGone(slot.ref.replica_id, str(e)[:300]) from None
            finally:
                slot.end_call(caller)
            slot.completed += 1
            slot.latencies_s.append(time.perf_counter() - started)
        finally:
            slot.release_capacity()
        if slot.ref.num_procs == 1:
            return [result] if all_ranks else result
        values = [v for _, v in sorted(result.items(), key=lambda pv: pv[0].rank)]
        return values if all_ranks else values[0]

    def _session(self) -> _Session | None:
        stack = self._sessions.get(asyncio.current_task())
        return stack[-1] if stack else None

    async def route(self, method: str, args: tuple, kwargs: dict) -> Any:
        """Call ``method`` on one healthy replica; infrastructure failures are resent elsewhere.

        A call is resent at most ``max_retries`` times, and never after it has taken down
        ``poison_threshold`` different replicas (each died or hung while running it): such a
        request is more likely the cause than the victim, and resending it would take down
        the rest. Different replicas, not deaths: a request that waited out the rebuild of
        the one replica it was on, and was on the rebuilt one when that died too, was
        unlucky twice on one replica (a run whose only generator is killed repeatedly), and
        is bounded by ``max_retries`` instead.
        """
        self._ensure_watcher()
        session = self._session()
        options = self._options
        taken_down: dict[int, _ReplicaGone] = {}  # replica id -> how it went
        for _ in range(options.max_retries + 1):
            slot = await self._pick(session)
            try:
                return await self._call(slot, method, args, kwargs, options.all_ranks)
            except _ReplicaGone as gone:
                last = gone
                if gone.was_running:
                    taken_down[gone.replica_id] = gone
                if len(taken_down) >= options.poison_threshold:
                    raise ReplicaFailed(
                        f"service {self.name!r}: {method}.route() was running on {len(taken_down)} replicas "
                        f"({', '.join(map(str, sorted(taken_down)))}) when each died or hung (last: "
                        f"{gone.reason}); the request is likely the cause, so it is not resent (poison_threshold="
                        f"{options.poison_threshold}). The replicas are being rebuilt",
                        gone.replica_id,
                    ) from None
                logger.info("service %s: %s resent after replica %d failed", self.name, method, gone.replica_id)
        raise ReplicaFailed(
            f"service {self.name!r}: {method}.route() was sent {options.max_retries + 1} times and "
            f"each replica it was sent to failed (last: replica {last.replica_id}: {last.reason}); see "
            "service.statistics() for replica states",
            last.replica_id,
        )

    async def fanout(self, method: str, args: tuple, kwargs: dict, partial: bool | None = None) -> list[Any]:
        """Call ``method`` on every healthy replica; results in replica order.

        Fan-outs are rare and must reach every replica, so the membership is refreshed
        from the controller first. With ``partial`` (default: the service's
        ``fanout_partial``) a replica that fails has a ``ReplicaFailure`` in its place.
        """
        partial = self._options.fanout_partial if partial is None else partial
        self._ensure_watcher()
        await self._refresh()
        await self._remember(method, args, kwargs)
        if not self._healthy_loads:
            await self._pick(None)
        slots = sorted(self._slots.values(), key=lambda s: s.ref.replica_id)
        results = await asyncio.gather(
            *(self._call_or_fail(s, method, args, kwargs, "fanout") for s in slots), return_exceptions=True
        )
        out = []
        for slot, result in zip(slots, results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError) or not (
                    partial or self._replayed_later(method, result)
                ):
                    raise result
                result = ReplicaFailure(slot.ref.replica_id, result)
            out.append(result)
        return out

    def _replayed_later(self, method: str, error: BaseException) -> bool:
        """A replica died running a ``@replay_on_rebuild`` call: its rebuild replays it, so
        the call has not failed (the replica's entry is a ``ReplicaFailure``)."""
        return method in self._replayed and isinstance(error, ReplicaFailed)

    async def rolling(self, method: str, args: tuple, kwargs: dict) -> list[Any]:
        """Call ``method`` on every healthy replica, one at a time.

        The replica being called is taken out of this process's routing first and its
        in-flight calls from here finish, so ``route()`` keeps being served by the others.
        """
        self._ensure_watcher()
        await self._refresh()
        await self._remember(method, args, kwargs)
        results = []
        for replica_id in sorted(self._slots):
            slot = self._slots.get(replica_id)
            if slot is None or slot.is_gone:
                continue
            if len(self._slots) == 1:  # a single replica: nothing else can serve meanwhile
                results.append(await self._rolling_call(slot, method, args, kwargs))
                continue
            self._excluded.add(replica_id)
            self._refresh_loads()
            try:
                await self._drained(slot, method)
                results.append(await self._rolling_call(slot, method, args, kwargs))
            finally:
                self._excluded.discard(replica_id)
                self._refresh_loads()
                self._notify()
        return results

    async def _drained(self, slot: Slot, method: str) -> None:
        """Wait until this process's calls to a replica held out by ``rolling()`` have finished."""
        if not await slot.quiet(self._options.unavailable_timeout_s):
            raise TimeoutError(
                f"service {self.name!r}: {method}.rolling(): replica {slot.ref.replica_id} still had "
                f"{slot.load.in_flight} call(s) in flight and {slot.load.queued} queued after "
                f"{self._options.unavailable_timeout_s} s (unavailable_timeout_s)")

    async def _rolling_call(self, slot: Slot, method: str, args: tuple, kwargs: dict) -> Any:
        try:
            return await self._call_or_fail(slot, method, args, kwargs, "rolling")
        except ReplicaFailed as e:
            if not self._replayed_later(method, e):
                raise
            return ReplicaFailure(slot.ref.replica_id, e)

    async def _remember(self, method: str, args: tuple, kwargs: dict) -> None:
        """Give the controller a ``@replay_on_rebuild`` call first, so a replica rebuilt from
        now on gets it too (one rebuilt during this call gets it from the controller)."""
        if method not in self._replayed or self._broken is not None:
            return
        call = ReplayedCall.of(method, args, kwargs)
        self._replays.pop(method, None)
        self._replays[method] = call  # a replacement controller gets these
        try:
            await asyncio.wait_for(_await_monarch(self._controller.remember.choose(call)), _WATCH_TIMEOUT_S)
        except Exception as e:  # a dead controller: its replacement is given this call
            logger.info("service %s: could not give the controller %s: %r", self.name, method, e)

    async def _call_or_fail(self, slot: Slot, method: str, args: tuple, kwargs: dict, adverb: str) -> Any:
        """A call to one given replica (fanout, rolling): its death is a ReplicaFailed, not a resend."""
        try:
            return await self._call(slot, method, args, kwargs, self._options.all_ranks)
        except _ReplicaGone as gone:
            raise ReplicaFailed(
                f"service {self.name!r}: replica {slot.ref.replica_id} failed during "
                f"{method}.{adverb}(): {gone.reason}",
                slot.ref.replica_id,
            ) from None

    # ---- sessions and statistics ----------------------------------------------

    def enter_session(self) -> None:
        self._sessions.setdefault(asyncio.current_task(), []).append(_Session())

    def exit_session(self) -> None:
        stack = self._sessions.get(asyncio.current_task())
        if stack:
            stack.pop()

    def counters(self) -> dict[int, Slot]:
        merged = dict(self._retired)
        merged.update(self._slots)
        return merged

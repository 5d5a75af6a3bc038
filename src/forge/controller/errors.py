"""Forge's exception hierarchy for actors and services.

Application errors (an endpoint raised) and infrastructure failures (a process died or
hung) are different things, and callers should be able to tell them apart:

* ``EndpointError`` — user code raised inside an endpoint. It carries the original
  exception, its type name, message and the remote traceback. The replica keeps serving.
* ``ServiceUnavailable`` — no healthy replica appeared within the service's bound.
* ``ReplicaFailed`` — a replica's processes died or hung (raised from ``fanout`` and
  ``as_actor``; ``route`` retries such failures on another replica instead).
"""

from __future__ import annotations


class ForgeError(Exception):
    """Base class of every error Forge raises on purpose."""


class EndpointError(ForgeError):
    """An endpoint raised an exception in user code on a remote actor.

    Attributes:
        original: the exception object raised remotely (unpickled), when available.
        original_type: the qualified type name of that exception, e.g. ``"builtins.KeyError"``.
        remote_traceback: the traceback text formatted in the remote process.
        endpoint: ``"Class.endpoint"`` that raised.
        replica_id: the replica that ran the call, or ``None`` for a plain actor.
    """

    def __init__(
        self,
        endpoint: str,
        original: BaseException | None,
        original_type: str,
        message: str,
        remote_traceback: str,
        replica_id: int | None = None,
    ) -> None:
        where = f" on replica {replica_id}" if replica_id is not None else ""
        super().__init__(
            f"{endpoint}{where} raised {original_type}: {message}\n"
            f"Remote traceback:\n{remote_traceback}"
        )
        vars(self).update(endpoint=endpoint, original=original, original_type=original_type, message=message,
                          remote_traceback=remote_traceback, replica_id=replica_id)

    def __reduce__(self):
        return (
            EndpointError,
            (
                self.endpoint,
                self.original,
                self.original_type,
                self.message,
                self.remote_traceback,
                self.replica_id,
            ),
        )


class ServiceUnavailable(ForgeError):
    """No healthy replica could take a call within the service's ``unavailable_timeout_s``."""


class HostRegistryLost(ForgeError):
    """The host pool's registry process died. Forge does not replace it: it held the
    pool's leases and placements, so the pool (and a run on it) cannot go on. Restart
    the job; a GRPO run resumes from its last checkpoint with ``--resume``."""


class ReplicaFailed(ForgeError):
    """A replica's processes died, hung, or failed to start."""

    def __init__(self, message: str, replica_id: int | None = None) -> None:
        super().__init__(message)
        self.replica_id = replica_id

    def __reduce__(self):
        return (ReplicaFailed, (self.args[0], self.replica_id))


class ForgeUsageError(ForgeError, TypeError):
    """An API was used in a way it does not support (e.g. ``.choose()`` on a service)."""


def is_infrastructure_error(error: BaseException) -> bool:
    """Whether ``error`` is a failure of a process or actor (Monarch's ``SupervisionError``:
    it died, or its host did), not an exception raised by user code."""
    return type(error).__name__ == "SupervisionError"

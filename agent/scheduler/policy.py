"""The dispatch decision: what runs when an execution slot frees.

One interface for every way of deciding, so the hand-written rules of today, the baselines they
are compared with, and the learned policy to come are swapped by config (``[agent] policy``) and
driven by the same scheduler, live and in the simulator:

* :class:`Action` is the decision: which model's queue (lane), how big a batch, on which instance,
  and where it runs and how far: ``target`` (this board, or a peer's device id), ``split`` (the split
  point after which a peer runs the rest) and ``exit``, for offload and early exit.
* :class:`Policy` decides. The scheduler (``agent.scheduler.dispatcher``) keeps the mechanism:
  queues, the shedding of requests that can no longer finish, admission, slot accounting. When a
  slot may be filled it calls :meth:`Policy.decide` with itself as the state; when an idle board
  receives a request, :meth:`Policy.alone`; when it has popped a batch, :meth:`Policy.dispatched`;
  when a batch has been answered, :meth:`Policy.observe`.

Each policy lives in a module of its own under ``agent.scheduler.policies``, named as the config
names it; the module's ``build(scheduler)`` returns the policy (:func:`build_policy`). A new policy
is one new file there plus ``policy = "<its name>"`` in a config.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:   # the scheduler imports this module; the types are for readers and checkers
    from agent.scheduler.dispatcher import Dispatch, ModelLane, Scheduler
    from agent.scheduler.request import Request

#: ``Action.target`` of a batch run on this board.
LOCAL = "local"
#: The policy the agent runs when the config names none.
DEFAULT_POLICY = "rules"


class Action(NamedTuple):
    """One dispatch decision (a named tuple: immutable, and cheap to make once per batch).

    ``model``: the lane whose queue the batch is popped from; ``batch_size``: how many requests it
    takes at most (fewer when some expire as it is popped); ``instance``: which of the model's
    instances runs it, ``None`` for any free one; ``target``: where it runs, ``LOCAL`` or a peer's
    device id (the peer runs the rest of the network under its own scheduler); ``exit``: the early
    exit it leaves the network by (``None``: the last layer); ``split``: with a peer target, the
    model card's split point after which the peer takes over (this board runs the head up to it),
    ``None`` to send the whole input (full offload); ``requests``: the ids of the lane's queued
    requests the batch takes, whatever their order (those with the most time left, for a peer
    whose round trip the most urgent ones cannot afford; requests admitted for a peer), ``()`` for
    the queue's own order (earliest deadline first).
    """

    model: str
    batch_size: int
    instance: int | None = None
    target: str = LOCAL
    exit: int | None = None
    split: str | None = None
    requests: tuple[int, ...] = ()


class Policy(Protocol):
    """Decides each dispatch; learns from what happened. See the module docstring for when each
    method is called. Implementations keep no reference to requests after a call returns.

    When models are loaded or unloaded, or a lane's rule changes, while serving (``load-model``,
    ``unload-model``, ``set-batching``), a policy named in the config is built again for the new
    lanes; a policy object given to the scheduler directly follows them only if it has
    ``lanes_changed(scheduler)`` (else the change is refused)."""

    name: str

    def decide(self, scheduler: "Scheduler", now: float) -> tuple[Action | None, float]:
        """The batch to start now, or ``None`` to leave the slots idle, and when to be asked again
        if nothing arrives or finishes first (``math.inf``: not before then). Called with every
        request that can no longer finish in time already taken out of the queues; a returned
        action names a lane with a queued request and a free instance, and ``1 <= batch_size <=``
        the lane's ``rule.max_batch`` (its batch buffers are that big)."""

    def alone(self, scheduler: "Scheduler", lane: "ModelLane", request: "Request") -> Action | None:
        """A request has arrived at an idle board (nothing queued, nothing in flight): the action
        that starts it at once without queueing it, or ``None`` to queue it as any other."""

    def dispatched(self, action: Action, n: int, now: float) -> None:
        """The batch of ``action`` left its queue at ``now`` with ``n`` requests."""

    def observe(self, dispatch: "Dispatch", now: float) -> None:
        """The batch of ``dispatch`` has been answered; ``now`` is when its last reply went."""


def policy_names() -> list[str]:
    """The policies a config may name: the modules of ``agent.scheduler.policies``."""
    from agent.scheduler import policies
    return sorted(module.name for module in pkgutil.iter_modules(policies.__path__) if not module.name.startswith("_"))


def build_policy(name: str, scheduler: "Scheduler") -> Policy:
    """The policy ``name`` (a module of ``agent.scheduler.policies``) for ``scheduler``."""
    if name not in policy_names():
        raise ValueError(f"policy = {name!r}: expected one of {policy_names()}")
    return importlib.import_module(f"agent.scheduler.policies.{name}").build(scheduler)


__all__ = ["Action", "Policy", "LOCAL", "DEFAULT_POLICY", "build_policy", "policy_names"]

"""The lifecycle state machine: states, the allowed transitions, and who is told. No I/O.

    starting [-> provisioning] -> loading -> warming -> ready
    ready -> unhealthy -> ready | restarting
    * -> restarting -> starting
    * -> failed            (give-up, or a fatal error)
    * -> draining -> stopped

`failed -> loading` is allowed too: in attach mode shepherd does not own the server, so when the
server comes back (a new load line, a healthy probe) the worker recovers instead of staying broken
for good (Vast's PyWorker marks a worker errored forever after one bad line).

A transition's reason is public: it is shown by `/status` and `/ready`, logged, and sent to the
autoscaler as `error_msg`; it often quotes a model server's log line. So the machine passes every
reason through its `redact` function (supervisor/redact.py's `Redactor.redact` in a running worker)
before anyone sees it: no listener, no reader of `reason`, ever gets the raw text.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.redact import keep


class State(enum.Enum):
    STARTING = "starting"
    PROVISIONING = "provisioning"  # the steps before the model server (--before), or the image's own
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"


_ANY_LIVE = {State.RESTARTING, State.FAILED, State.DRAINING}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.LOADING, State.PROVISIONING} | _ANY_LIVE),
    # One transition per step: its reason (the step) is what /status and the logs show.
    State.PROVISIONING: frozenset({State.PROVISIONING, State.LOADING, State.FAILED, State.DRAINING}),
    State.LOADING: frozenset({State.WARMING} | _ANY_LIVE),
    State.WARMING: frozenset({State.READY} | _ANY_LIVE),
    State.READY: frozenset({State.UNHEALTHY} | _ANY_LIVE),
    State.UNHEALTHY: frozenset({State.READY} | _ANY_LIVE),
    State.RESTARTING: frozenset({State.STARTING, State.FAILED, State.DRAINING}),
    State.FAILED: frozenset({State.LOADING, State.DRAINING}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}

# States in which the model server may be about to serve: a request may wait for `ready`.
COMING_UP = frozenset({State.STARTING, State.PROVISIONING, State.LOADING, State.WARMING, State.RESTARTING,
                       State.UNHEALTHY})


def allowed(current: State, target: State) -> bool:
    return target in TRANSITIONS[current]


class TransitionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Transition:
    from_: State
    to: State
    reason: str
    at: float  # monotonic (trio) clock


Listener = Callable[[Transition], None]


class StateMachine:
    """Holds the current state; refuses transitions the table does not allow; tells listeners.

    Listeners are plain callables run synchronously on every transition (log it, wake waiters,
    poke the reporter); they must not block.

    `redact` masks secrets in reasons (see the module docstring); the default keeps them as they are.
    The Lifecycle uses the same function for `last_error`.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        initial: State = State.STARTING,
        redact: Callable[[str], str] = keep,
    ) -> None:
        self._clock = clock
        self.redact: Callable[[str], str] = redact
        self.state = initial
        self.since = clock()
        self.reason = "shepherd started"
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def can(self, target: State) -> bool:
        return allowed(self.state, target)

    def to(self, target: State, reason: str) -> Transition:
        reason = self.redact(reason)  # before the error message too: it may be logged or shown
        if not allowed(self.state, target):
            raise TransitionError(f"{self.state.value} -> {target.value} is not a lifecycle transition ({reason})")
        transition = Transition(self.state, target, reason, self._clock())
        self.state, self.since, self.reason = target, transition.at, reason
        for listener in list(self._listeners):
            listener(transition)
        return transition

    def try_to(self, target: State, reason: str) -> Transition | None:
        """Transition when allowed; else do nothing (e.g. an error line seen while draining)."""
        return self.to(target, reason) if allowed(self.state, target) else None

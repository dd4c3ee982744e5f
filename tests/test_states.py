"""Tests for supervisor.states: the transition table against DESIGN.md, and the StateMachine."""

from __future__ import annotations

import itertools

import pytest

from supervisor.states import TRANSITIONS, State, StateMachine, Transition, TransitionError, allowed

S = State
LIVE = (S.STARTING, S.LOADING, S.WARMING, S.READY, S.UNHEALTHY)

# Written out from DESIGN.md ("Lifecycle states") and the attach-mode recovery, independently of the code:
#   starting -> loading -> warming -> ready; ready -> unhealthy -> ready | restarting;
#   * -> restarting -> starting; * -> failed; * -> draining -> stopped; failed -> loading (attach).
EXPECTED: dict[State, set[State]] = {
    S.STARTING: {S.LOADING, S.PROVISIONING, S.RESTARTING, S.FAILED, S.DRAINING},
    S.PROVISIONING: {S.PROVISIONING, S.LOADING, S.FAILED, S.DRAINING},
    S.LOADING: {S.WARMING, S.RESTARTING, S.FAILED, S.DRAINING},
    S.WARMING: {S.READY, S.RESTARTING, S.FAILED, S.DRAINING},
    S.READY: {S.UNHEALTHY, S.RESTARTING, S.FAILED, S.DRAINING},
    S.UNHEALTHY: {S.READY, S.RESTARTING, S.FAILED, S.DRAINING},
    S.RESTARTING: {S.STARTING, S.FAILED, S.DRAINING},
    S.FAILED: {S.LOADING, S.DRAINING},
    S.DRAINING: {S.STOPPED},
    S.STOPPED: set(),
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State) == set(EXPECTED)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(State, State)),
                         ids=lambda s: s.value)
def test_transition_allowed_iff_in_table(current: State, target: State) -> None:
    expected = target in EXPECTED[current]
    assert allowed(current, target) is expected
    assert (target in TRANSITIONS[current]) is expected
    machine = StateMachine(FakeClock(), initial=current)
    assert machine.can(target) is expected
    if expected:
        transition = machine.to(target, "test")
        assert transition.from_ is current and transition.to is target
        assert machine.state is target
    else:
        with pytest.raises(TransitionError):
            machine.to(target, "test")
        assert machine.state is current


def test_happy_path_and_recovery_from_unhealthy() -> None:
    machine = StateMachine(FakeClock())
    assert machine.state is S.STARTING
    for target in (S.LOADING, S.WARMING, S.READY, S.UNHEALTHY, S.READY, S.UNHEALTHY, S.RESTARTING, S.STARTING,
                   S.LOADING, S.WARMING, S.READY, S.DRAINING, S.STOPPED):
        machine.to(target, f"to {target.value}")
    assert machine.state is S.STOPPED


@pytest.mark.parametrize("state", LIVE, ids=lambda s: s.value)
@pytest.mark.parametrize("target", (S.RESTARTING, S.FAILED, S.DRAINING), ids=lambda s: s.value)
def test_every_live_state_can_restart_fail_or_drain(state: State, target: State) -> None:
    assert allowed(state, target)


def test_stopped_is_terminal() -> None:
    assert TRANSITIONS[S.STOPPED] == frozenset()
    machine = StateMachine(FakeClock(), initial=S.STOPPED)
    for target in State:
        assert machine.try_to(target, "late event") is None
    assert machine.state is S.STOPPED


def test_failed_recovers_to_loading_in_attach_mode() -> None:
    machine = StateMachine(FakeClock(), initial=S.LOADING)
    machine.to(S.FAILED, "error line")
    machine.to(S.LOADING, "load line seen again")
    assert machine.state is S.LOADING


def test_draining_only_goes_to_stopped() -> None:
    assert TRANSITIONS[S.DRAINING] == frozenset({S.STOPPED})


def test_forbidden_move_raises_and_leaves_state_reason_and_since_unchanged() -> None:
    clock = FakeClock()
    machine = StateMachine(clock)
    machine.to(S.LOADING, "spawned")
    clock.now = 105.0
    seen: list[Transition] = []
    machine.subscribe(seen.append)
    with pytest.raises(TransitionError) as info:
        machine.to(S.READY, "skipped warming")
    assert "loading" in str(info.value) and "ready" in str(info.value)
    assert machine.state is S.LOADING
    assert machine.reason == "spawned"
    assert machine.since == 100.0
    assert seen == []


def test_listeners_get_one_transition_per_move() -> None:
    clock = FakeClock()
    machine = StateMachine(clock)
    first: list[Transition] = []
    second: list[Transition] = []
    machine.subscribe(first.append)
    machine.subscribe(second.append)
    clock.now = 101.0
    t1 = machine.to(S.LOADING, "spawned pid 42")
    clock.now = 130.5
    t2 = machine.to(S.WARMING, "load line seen")
    assert first == second == [t1, t2]
    assert t1 == Transition(from_=S.STARTING, to=S.LOADING, reason="spawned pid 42", at=101.0)
    assert t2 == Transition(from_=S.LOADING, to=S.WARMING, reason="load line seen", at=130.5)
    assert machine.since == 130.5 and machine.reason == "load line seen"


def test_listener_sees_the_new_state() -> None:
    machine = StateMachine(FakeClock())
    states: list[State] = []
    machine.subscribe(lambda t: states.append(machine.state))
    machine.to(S.LOADING, "x")
    assert states == [S.LOADING]


def test_try_to_returns_none_when_not_allowed_and_tells_nobody() -> None:
    machine = StateMachine(FakeClock(), initial=S.DRAINING)
    seen: list[Transition] = []
    machine.subscribe(seen.append)
    assert machine.try_to(S.RESTARTING, "error line while draining") is None
    assert machine.state is S.DRAINING and seen == []
    transition = machine.try_to(S.STOPPED, "drained")
    assert transition is not None and transition.to is S.STOPPED
    assert seen == [transition]


def test_initial_state_and_since() -> None:
    clock = FakeClock()
    clock.now = 7.0
    machine = StateMachine(clock)
    assert machine.state is S.STARTING and machine.since == 7.0

"""Provisioning: what runs before the model server (downloads, installs), in state `provisioning`.

Two things, in this order (`Provisioner.run`):

- While `marker` exists (Vast's base images create `/.provisioning` while their own provisioning runs),
  wait: the image is not done yet.
- The `--before` steps (`BEFORE_CMDS`), each `/bin/sh -c STEP` in a session of its own, one after the
  other. Each step is one transition `provisioning -> provisioning` whose reason names it; its output
  becomes `model.log` events with `stream` and `step`; `/status` shows the step, its elapsed time and
  its last line (a download's progress is what an operator wants to see). A step that exits non-zero is
  the failure (state `failed`, exit 1): steps are not servers, there is nothing to restart. A shutdown
  during a step stops its tree as it would a model server's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from supervisor.logfile import LogFile
from supervisor.logs import get_logger
from supervisor.process import pipe_readers, spawn, stop_tree
from supervisor.states import State, StateMachine

MARKER_POLL_S = 1.0
STEP_STOP_GRACE_S = 10.0
PIPE_DRAIN_S = 2.0  # after a step exits, what its own children still write is read this long
LAST_LINE_CHARS = 512


@dataclass
class StepStatus:
    index: int  # 1-based
    total: int
    command: str
    started_wall: float
    last_line: str = ""


class Provisioner:
    def __init__(self, steps: Sequence[str], marker: Path | None, machine: StateMachine,
                 env: Mapping[str, str] | None = None) -> None:
        self.steps = tuple(steps)
        self.marker = marker
        self.machine = machine
        self.env = env
        self.step: StepStatus | None = None
        self.log_file: LogFile | None = None  # the model's log file, when there is one: steps write there too
        self._spawning = False
        self._pid: int | None = None
        self._log = get_logger("supervisor.provision")
        self._model_log = get_logger("model")

    def owned(self) -> set[int] | None:
        """The step's pid, which trio waits on: the subreaper must leave it alone (it would steal the
        exit code, and trio would read 0 for a failed step). None while a spawn is under way."""
        if self._spawning:
            return None
        return {self._pid} if self._pid is not None else set()

    def status(self) -> dict[str, Any] | None:
        step = self.step
        if step is None:
            return None
        return {"step": step.index, "of": step.total, "command": self.machine.redact(step.command),
                "elapsed_s": round(time.time() - step.started_wall, 3), "last_line": self.machine.redact(step.last_line)}

    async def run(self) -> str | None:
        """Wait for the marker, then run the steps. Returns why it failed, or None."""
        if self.marker is not None and await trio.to_thread.run_sync(self.marker.exists):
            self.machine.to(State.PROVISIONING, f"waiting for {self.marker} to go (the image's own provisioning)")
            while await trio.to_thread.run_sync(self.marker.exists):
                await trio.sleep(MARKER_POLL_S)
            self._log.info("provision.marker_gone", marker=str(self.marker))
        for index, command in enumerate(self.steps, 1):
            self.step = StepStatus(index, len(self.steps), command, time.time())
            self.machine.to(State.PROVISIONING, f"step {index}/{len(self.steps)}: {command}")
            error = await self._run_step(self.step)
            if error is not None:
                return error
        self.step = None
        return None

    async def _run_step(self, step: StepStatus) -> str | None:
        started = trio.current_time()
        self._spawning = True
        try:
            process = await spawn(("/bin/sh", "-c", step.command), self.env)
        except OSError as exc:
            return f"provisioning step {step.index} cannot start: {exc.strerror or exc}"
        finally:
            self._spawning = False
        self._pid = process.pid
        self._log.info("provision.step", step=step.index, of=step.total, pid=process.pid, command=step.command)

        def sink(stream: str, line: str) -> None:
            step.last_line = line[:LAST_LINE_CHARS]
            self._model_log.info("model.log", stream=stream, step=step.index, line=line, pid=process.pid)
            if self.log_file is not None:
                self.log_file.write_line(stream, line)

        readers = pipe_readers(process, sink)
        try:
            async with trio.open_nursery() as pipes:
                for reader in readers:
                    pipes.start_soon(reader.run)
                code = await process.process.wait()
                for reader in readers:
                    reader.read_available()
                pipes.cancel_scope.deadline = trio.current_time() + PIPE_DRAIN_S
        finally:
            with trio.CancelScope(shield=True):
                await stop_tree(process, STEP_STOP_GRACE_S)  # what it left running, or it all on shutdown
            self._pid = None
        seconds = round(trio.current_time() - started, 3)
        self._log.info("provision.step_done", step=step.index, exit_code=code, seconds=seconds)
        if code != 0:
            tail = process.last_stderr(redact=self.machine.redact)
            reason = f"provisioning step {step.index}/{step.total} exited with code {code}: {step.command}"
            return f"{reason}; last stderr: {tail}" if tail else reason
        return None

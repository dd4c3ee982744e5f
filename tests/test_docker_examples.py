"""The example Dockerfiles (deploy/docker/) parse, and their entrypoint is a working shepherd command line.

No Docker engine runs here, so the images are not built; what can drift is checked instead: each file
parses (dockerfile-parse), installs this checkout, makes `shepherd` the exec-form ENTRYPOINT, and its
ENTRYPOINT + CMD with its ENV (plus what Vast sets on an instance) is a configuration shepherd accepts;
the entrypoint itself runs `--help` with shepherd installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from supervisor.config import load_config

DOCKER = Path(__file__).resolve().parent.parent / "deploy" / "docker"
FILES = sorted(DOCKER.glob("*.Dockerfile"))
VAST_ENV = {"CONTAINER_ID": "1234", "PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_3000": "41000"}


def parsed(path: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=path.open("rb"))  # in memory: nothing is written next to it
    return parser


def test_there_are_examples_for_the_backends() -> None:
    assert {p.name for p in FILES} >= {"vllm.Dockerfile", "tgi.Dockerfile"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_dockerfile_installs_shepherd_as_its_entrypoint(path: Path) -> None:
    docker = parsed(path)
    assert docker.baseimage and ":" in docker.baseimage  # a pinned release, not `latest`
    instructions = [(i["instruction"], i["value"]) for i in docker.structure]
    assert ("COPY", ". /opt/shepherd") in instructions
    assert any(kind == "RUN" and "pip install" in value and "/opt/shepherd" in value for kind, value in instructions)
    entrypoint = json.loads(next(value for kind, value in instructions if kind == "ENTRYPOINT"))
    assert entrypoint == ["shepherd"]  # exec form: shepherd is PID 1 and gets the signals
    command = json.loads(next(value for kind, value in instructions if kind == "CMD"))
    config = load_config(command, {**docker.envs, **VAST_ENV})
    assert config.backend == docker.envs["BACKEND"] and config.command and not config.attach
    assert config.worker_port == 3000 and not config.unsecured  # secured on Vast: signatures checked


def test_the_entrypoint_runs_help() -> None:
    shepherd = shutil.which("shepherd")
    assert shepherd, "the `shepherd` console script is not installed: pip install -e ."
    result = subprocess.run([shepherd, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout and "--before" in result.stdout

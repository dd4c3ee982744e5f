"""ComfyUI 0.3.64 (../shared/vendor/ComfyUI, with `--cpu`) under `--backend generic`: the install works,
and a server that answers the benchmark route with 405 becomes `ready` unmeasured instead of being
restarted five times (issue 9; shepherd's own ComfyUI backend is issue 10)."""

from __future__ import annotations

import shutil
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from tests.harness import Shepherd, alive, free_port, wait_until
from tests.real import scenarios
from tests.real.conftest import need
from tests.real.layout import Layout, comfyui_source

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

# EmptyImage -> SaveImage: no weights, well under a second on the CPU.
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16711680}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "shepherd"}},
}


def test_comfyui_runs_under_shepherd(layout: Layout, tmp_path: Path, shepherds: list[Shepherd]) -> None:
    python = need(layout.comfyui_python, "ComfyUI's venv")
    source = need(comfyui_source(), "the vendored ComfyUI source")
    work = tmp_path / "ComfyUI"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("__pycache__", ".git"))  # it writes beside itself
    (work / "custom_nodes").mkdir(exist_ok=True)  # empty in ComfyUI's repository, so not in the vendored copy
    port = free_port()
    s = Shepherd(["--backend", "generic", "--", str(python), str(work / "main.py"), "--cpu", "--listen", "127.0.0.1",
                  "--port", str(port), "--disable-auto-launch"], model_port=port,
                 env={"MODEL_HEALTH_ENDPOINT": "/system_stats", "MODEL_LOAD_LOG_MSG": "To see the GUI go to:",
                      "BENCHMARK_CACHE": str(tmp_path / "benchmark.json"), "BENCHMARK_RUNS": "1"})
    shepherds.append(s)
    s.wait_state("ready", timeout=scenarios.READY_TIMEOUT)
    status = s.status()
    assert status["capacity_source"] == "unmeasured" and "HTTP 405" in status["capacity_error"], status
    assert status["model"]["restarts"] == 0
    assert s.find("model.load_line_missing") == []  # ComfyUI's own line was seen

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as comfy:
        answer = comfy.post("/prompt", json={"prompt": WORKFLOW, "client_id": uuid.uuid4().hex})
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        history = wait_until(lambda: comfy.get(f"/history/{prompt_id}").json().get(prompt_id), 60,
                             "the workflow to finish")
    assert history["status"]["status_str"] == "success", history["status"]
    images = history["outputs"]["2"]["images"]
    assert len(images) == 1 and (work / "output" / images[0]["filename"]).stat().st_size > 0

    tree = [p.pid for p in s.tree()]
    s.signal(signal.SIGTERM)
    assert s.wait_exit(60) == 0  # ComfyUI dies of the SIGTERM (-15) without a word: a clean stop
    wait_until(lambda: not any(alive(pid) for pid in tree), 30, "ComfyUI's processes to be gone")

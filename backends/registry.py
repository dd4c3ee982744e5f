"""The backends shepherd knows, by name."""

from __future__ import annotations

from backends import comfyui, demo, generic, openai, tgi
from backends.spec import BackendSpec

BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (demo.SPEC, generic.SPEC, tgi.SPEC, openai.VLLM, openai.SGLANG, openai.LLAMACPP, openai.OLLAMA,
                 comfyui.COMFYUI_JSON)
}


def get_backend(name: str) -> BackendSpec:
    return BACKENDS[name]

"""MedVLM 3D: a 3D medical vision-language model built on a pretrained 2D slice encoder.

The public API is imported lazily so that `python -m medvlm info` and the app start without
loading torch until a model is needed.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Volume": "volume",
    "VolumeError": "errors",
    "CheckpointError": "errors",
    "UserInputError": "errors",
    "load_volume": "volume",
    "MedVLMConfig": "configuration",
    "MedVLMForConditionalGeneration": "modeling",
    "Pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medvlm' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)

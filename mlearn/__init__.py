"""mlearn: identity embeddings (faces, speakers) with metric learning."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    # Lazy: `import mlearn` stays light (no torch, no onnxruntime) until load_model is used.
    if name == "load_model":
        from mlearn.inference import load_model

        return load_model
    raise AttributeError(f"module 'mlearn' has no attribute '{name}'")

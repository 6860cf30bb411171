"""mlearn: identity embeddings (faces, speakers) with metric learning."""
from __future__ import annotations

__version__ = "0.1.0"

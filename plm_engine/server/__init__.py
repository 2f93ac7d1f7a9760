"""OpenAI-compatible HTTP server over the generation engine (`plm-engine serve`).

Needs the "serve" extra (fastapi, uvicorn, prometheus_client). Nothing heavy is imported until used, so plm_engine.cli can
import plm_engine.server.cli to register the command without fastapi installed.
"""

__all__ = ["Embedder", "ServerLimits", "create_app"]


def __getattr__(name):
    if name in ("ServerLimits", "create_app"):
        from plm_engine.server import app

        return getattr(app, name)
    if name == "Embedder":
        from plm_engine.server.embeddings import Embedder

        return Embedder
    raise AttributeError(f"module 'plm_engine.server' has no attribute {name!r}")

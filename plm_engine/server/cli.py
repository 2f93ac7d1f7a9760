"""`plm-engine serve`: load the model(s), build the app, run uvicorn until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting connections and waits up to --drain-timeout seconds for in-flight
requests to finish; what is still running then is cancelled (which aborts its engine requests), the
app's shutdown stops the engine loop, and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import threading

log = logging.getLogger("plm_engine.server")


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, embeddings)",
        description="Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, "
        "/v1/embeddings, /v1/models, /health, /metrics.",
    )
    s.add_argument(
        "--model",
        default="smollm2-135m",
        help="generation model: a HF folder, a .gguf file, a packaged name or a Hub id (org/name)",
    )
    s.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the model's)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    s.add_argument("--embedding-model", default=None, help="also serve /v1/embeddings with this encoder (minilm-l6)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("PLM_ENGINE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $PLM_ENGINE_API_KEY)",
    )
    s.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache size in tokens (default: automatic)")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    s.add_argument("--device", default=None, help="cpu | cuda (default: where the model loads)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest accepted request body")
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds SIGTERM waits for in-flight requests before aborting them",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run)
    return s


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(args):
    """The app for parsed `serve` arguments (models loaded)."""
    from plm_engine.generation import AsyncEngine, Engine
    from plm_engine.server.app import ServerLimits, create_app
    from plm_engine.server.embeddings import Embedder

    engine = Engine(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    embedder = None
    if args.embedding_model:
        from plm_engine.models import load_model, load_tokenizer

        embedder = Embedder(load_model(args.embedding_model, device=args.device), load_tokenizer(args.embedding_model))
    return create_app(
        AsyncEngine(engine),
        embedder,
        api_key=args.api_key,
        model_name=args.served_model_name or args.model,
        embedding_model_name=args.embedding_model or "minilm-l6",
        limits=ServerLimits(max_body_bytes=args.max_body_bytes),
    )


def _graceful_server(config):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a handled SIGTERM/SIGINT once its graceful shutdown is done, so the process
        dies of the signal (status -15); a completed graceful shutdown exits 0 here instead."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"serve: {e.name} is not installed; pip install 'plm_engine[serve]'") from e
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_key == "":
        raise SystemExit("serve: --api-key must not be empty")
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("binding %s without --api-key: anyone who can reach this address can use the server", args.host)
    app = build_app(args)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
        access_log=args.log_level == "debug",
    )
    server = _graceful_server(config)
    server.run()
    return 0 if server.started else 1


def main(argv=None) -> int:
    """`python -m plm_engine.server.cli ...`: the serve command on its own (until plm_engine.cli wires it)."""
    p = argparse.ArgumentParser(prog="plm-engine")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

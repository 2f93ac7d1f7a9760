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

from plm_engine.generation.options import add_model_options, model_options

log = logging.getLogger("plm_engine.server")


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, embeddings)",
        description="Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, "
        "/v1/embeddings, /v1/models, /tokenize, /detokenize, /health, /metrics.",
    )
    add_model_options(s)
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
    s.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the cached KV blocks of a prompt's prefix shared with earlier requests",
    )
    s.add_argument("--device", default=None, help="cpu | cuda (default: where the model loads)")
    s.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + completion tokens per request (default and upper bound: min(model context, KV-cache size))",
    )
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest accepted request body")
    s.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="requests waiting to start beyond which new ones get 429 with Retry-After",
    )
    s.add_argument(
        "--limit-concurrency",
        type=int,
        default=1024,
        help="open connections + requests in progress beyond which uvicorn answers 503",
    )
    s.add_argument(
        "--timeout-keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open"
    )
    s.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds a request head (line + headers) may take"
    )
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive")
    s.add_argument("--max-header-bytes", type=int, default=16384, help="largest accepted request head")
    s.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from ORIGIN call the API (CORS; repeatable; '*' for any)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="on a loopback bind, a Host header name to accept besides localhost/127.0.0.1/::1 (repeatable)",
    )
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


def allowed_hosts(args) -> list[str] | None:
    """Host names accepted on a loopback bind (a DNS-rebinding page's Host is its own domain); any elsewhere."""
    if not _is_loopback(args.host):
        return None
    from plm_engine.server.middleware import LOOPBACK_HOSTS

    return [*LOOPBACK_HOSTS, args.host, *args.allowed_host]


def build_app(args):
    """The app for parsed `serve` arguments (models loaded)."""
    from plm_engine.generation import AsyncEngine, Engine
    from plm_engine.server.app import ServerLimits, create_app
    from plm_engine.server.embeddings import Embedder

    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_queued_requests=args.max_queued_requests,
        body_timeout=args.body_timeout,
    )

    engine = Engine(
        **model_options(args),
        tokenizer=args.tokenizer,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
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
        limits=limits,
        max_model_len=args.max_model_len,
        allowed_hosts=allowed_hosts(args),
        cors_origins=args.cors_origin,
    )


def uvicorn_config(app, args):
    """uvicorn's configuration for `serve`: its connection limits and timeouts, our h11 head timeout."""
    import uvicorn

    from plm_engine.server.h11_timeouts import h11_protocol_with_header_timeout

    return uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
        access_log=args.log_level == "debug",
        http=h11_protocol_with_header_timeout(args.header_timeout),
        limit_concurrency=args.limit_concurrency,
        timeout_keep_alive=args.timeout_keep_alive,
        h11_max_incomplete_event_size=args.max_header_bytes,
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
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"serve: {e.name} is not installed; pip install 'plm_engine[serve]'") from e
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_key == "":
        raise SystemExit("serve: --api-key must not be empty")
    for name in ("max_queued_requests", "limit_concurrency", "max_header_bytes", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"serve: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("timeout_keep_alive", "header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"serve: --{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("binding %s without --api-key: anyone who can reach this address can use the server", args.host)
    try:
        app = build_app(args)
    except (ValueError, FileNotFoundError) as e:  # a bad --model, --max-model-len ...: one line, no traceback
        raise SystemExit(f"serve: {e}") from None
    server = _graceful_server(uvicorn_config(app, args))
    server.run()
    return 0 if server.started else 1

"""AsyncEngine: an Engine driven from asyncio by one background step thread."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec

from plm_engine.generation.engine import Engine, RequestOutput
from plm_engine.generation.sampler import SamplingParams
from plm_engine.ops import checks

P = ParamSpec("P")


class EngineDeadError(RuntimeError):
    """The step loop gave up (its step kept failing, e.g. after a CUDA error): no request can run."""


def _final_output_of(
    stream: Callable[Concatenate[AsyncEngine, P], AsyncIterator[RequestOutput]],
) -> Callable[Concatenate[AsyncEngine, P], Coroutine[Any, Any, RequestOutput]]:
    """AsyncEngine.generate, written once from AsyncEngine.stream: the same arguments (the signature is
    stream's, so the two cannot drift apart) and the request's final output."""

    @functools.wraps(stream)
    async def generate(self: AsyncEngine, *args: P.args, **kwargs: P.kwargs) -> RequestOutput:
        last = None
        async for out in stream(self, *args, **kwargs):
            last = out
        assert last is not None, "stream() always ends with the request's final output"
        return last

    generate.__name__ = "generate"
    generate.__qualname__ = "AsyncEngine.generate"
    generate.__doc__ = "The final output of one request (the arguments are stream()'s)."
    return generate


class AsyncEngine:
    """Drives an Engine from asyncio: one background thread runs engine.step() while requests are pending.

    The model is not thread-safe, so only that thread touches the engine's scheduler and model: stream()
    validates and tokenizes the request in the caller (so bad input raises there), then hands it to the
    thread through a command queue; outputs come back through the caller's event loop.

        aeng = AsyncEngine(Engine("smollm2-135m"))
        async for out in aeng.stream("Hello", SamplingParams(max_tokens=32)):
            print(out.new_text, end="")
    """

    # A failed step fails the requests in it; this many failed steps in a row mean the engine is broken
    # (a sticky CUDA error, a corrupted cache): it is declared dead instead of failing every new request.
    MAX_CONSECUTIVE_STEP_FAILURES = 3

    def __init__(self, engine: Engine, max_consecutive_step_failures: int = MAX_CONSECUTIVE_STEP_FAILURES):
        import threading

        checks.require_positive("AsyncEngine", max_consecutive_step_failures=max_consecutive_step_failures)
        self.engine = engine
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self.dead_error: EngineDeadError | None = None
        self._cmds: list[tuple] = []
        self._cmd_lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple] = {}  # request id -> (event loop, asyncio.Queue)
        self._stop = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="plm-engine-step", daemon=True)
        self._thread.start()

    # ---- the step thread --------------------------------------------------------------------------

    def _submit(self, cmd: tuple) -> None:
        with self._cmd_lock:
            self._cmds.append(cmd)
        self._wake.set()

    def _deliver(self, rid: str, item) -> None:
        entry = self._streams.get(rid)
        if entry is None:
            return
        loop, q = entry
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(rid, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass

    def _drain(self) -> None:
        with self._cmd_lock:
            cmds, self._cmds = self._cmds, []
        for kind, arg in cmds:
            if kind == "add":
                if arg.request_id not in self._streams:  # its listener is gone (failed or cancelled): skip it
                    continue
                try:
                    self.engine.add_sequence(arg)
                except Exception as e:  # e.g. a request id in use, a request larger than the cache
                    self._deliver(arg.request_id, e)
            elif kind == "abort":
                self.engine.abort(arg)

    def _run(self) -> None:
        eng, failures = self.engine, 0
        while True:
            self._wake.clear()
            self._drain()
            if self._stop:
                for rid in list(eng._seqs):
                    eng.abort(rid)
                for out in eng.step():
                    self._deliver(out.request_id, out)
                self._stats = eng.stats()
                return
            if not eng.has_unfinished() and not eng._pending_outputs:
                self._stats = eng.stats()
                self._wake.wait()
                continue
            try:
                outs = eng.step()
            except Exception as e:  # fail every in-flight request rather than hang their streams
                for rid in list(eng._seqs):
                    eng.abort(rid)
                eng._pending_outputs.clear()
                self._stats = eng.stats()
                failures += 1
                if failures >= self.max_consecutive_step_failures:
                    self._die(e, failures)
                    return
                for rid in list(self._streams):
                    self._deliver(rid, e)
                continue
            failures = 0
            for out in outs:
                self._deliver(out.request_id, out)
            self._stats = eng.stats()

    def _die(self, cause: Exception, failures: int) -> None:
        dead = EngineDeadError(
            f"AsyncEngine: {failures} steps failed in a row, last with {type(cause).__name__}: {cause}"
        )
        dead.__cause__ = cause
        self.dead_error = dead  # set before the sweep below, so stream() sees it or is swept
        with self._cmd_lock:
            self._cmds.clear()
        for rid in list(self._streams):
            self._deliver(rid, dead)

    # ---- the asyncio side -------------------------------------------------------------------------

    async def stream(
        self,
        prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        truncate_prompt_tokens: int | None = None,
    ):
        """Yields a RequestOutput whenever the request gets tokens (deltas in new_token_ids / new_text),
        the last one with finished=True. Closing or cancelling the consumer aborts the request."""
        import asyncio

        if self.dead_error is not None:
            raise self.dead_error
        if self._stop:
            raise RuntimeError("AsyncEngine: shut down")
        seq = self.engine.make_sequence(prompt, params, request_id, truncate_prompt_tokens)
        rid = seq.request_id
        if rid in self._streams:
            raise ValueError(f"AsyncEngine: request id {rid!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        if self.dead_error is not None:  # died while we registered: the sweep may have missed us
            self._streams.pop(rid, None)
            raise self.dead_error
        self._submit(("add", seq))
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finished:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self._streams.pop(rid, None)
                self._submit(("abort", rid))

    generate = _final_output_of(stream)

    def stats(self) -> dict:
        """The engine's counters as of the end of the last step (no waiting on a step in progress)."""
        return dict(self._stats)

    def is_alive(self) -> bool:
        """Whether the background step thread is running (False after shutdown or once it is dead)."""
        return self._thread.is_alive() and not self._stop and self.dead_error is None

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Aborts in-flight requests (their streams end with finish_reason "abort") and stops the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

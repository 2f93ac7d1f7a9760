"""The model runner on the CPU: the compiled decode step (one unit per batch bucket) and the thread count.

Compiling costs seconds, so only the tiny model compiles here, and only where it proves something: the
greedy output is identical with and without compilation, and the compiled step runs no Python of the
model, its layers or its ops.
"""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

from plm_engine import ops
from plm_engine.generation import Engine, SamplingParams
from plm_engine.generation.compiled_decode import CompiledDecode, compile_enabled, cpu_buckets
from plm_engine.generation.model_runner import cpu_threads, physical_cores
from plm_engine.models.config import ModelConfig
from plm_engine.models.transformer import Transformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny")).eval()


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_compiled_decode_greedy_matches_eager_and_runs_no_model_python(tiny, keep_threads, monkeypatch):
    prompts = [[3, 4, 5, 6], [7] * 20, [9, 1]]
    # Different lengths: three sequences decode together (bucket 4), then one alone (bucket 1).
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 5, 5)]
    eager = Engine(tiny, kv_cache_tokens=512, max_num_seqs=4, compile=False)
    assert eager.graphs is None
    ref = eager.generate(prompts, params)

    eng = Engine(tiny, kv_cache_tokens=512, max_num_seqs=4, compile=True)
    assert isinstance(eng.graphs, CompiledDecode) and eng.graphs.buckets == [1, 2, 4]
    got = eng.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert sorted(eng.graphs.compiled) == [1, 4]  # compiled lazily: only the buckets that ran

    # One compiled decode step runs no Python of the model, its layers or the ops: with every one of
    # them replaced by a function that fails, the eager step fails and the compiled step still runs.
    eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    eng.step()  # prefill (eager)
    seqs = list(eng.scheduler.running)
    for s in seqs:
        assert eng.block_manager.grow(s.blocks, s.num_cached + 1)

    def fail(*args, **kwargs):
        raise AssertionError("Python of the model ran")

    with monkeypatch.context() as m:
        for cls in {type(mod) for mod in tiny.modules()}:
            m.setattr(cls, "forward", fail)
        for name in ("forward_tokens", "_forward_tokens", "_trunk", "_context"):
            m.setattr(Transformer, name, fail)
        for name in dir(ops):
            if inspect.isfunction(getattr(ops, name)):
                m.setattr(ops, name, fail)
        eng.graphs.fill([1], [0], [-1], [[0]], [1])  # one padding row: writes nothing
        with pytest.raises(AssertionError, match="Python of the model ran"):
            eng.graphs._forward(1)  # bucket 1's eager forward
        logits = eng.runner.decode(seqs)
    assert logits.shape == (1, tiny.config.vocab_size) and torch.isfinite(logits).all()
    # Under a Python-level profiler or debugger torch.compile declines its cached code: the step then
    # runs eagerly, with the same result.
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    sys.setprofile(lambda *a: None)
    try:
        traced = eng.generate([[9, 1]], p)[0].token_ids
    finally:
        sys.setprofile(None)
    assert traced == eager.generate([[9, 1]], p)[0].token_ids


def test_cpu_buckets():
    assert cpu_buckets(1) == [1]
    assert cpu_buckets(8) == [1, 2, 4, 8]
    assert cpu_buckets(12) == [1, 2, 4, 8, 12]
    assert cpu_buckets(256) == [1, 2, 4, 8, 16, 32, 64]


def test_compile_switch(monkeypatch):
    monkeypatch.setenv("PLM_ENGINE_COMPILE", "0")
    assert not compile_enabled(None) and compile_enabled(True)
    monkeypatch.setenv("PLM_ENGINE_COMPILE", "1")
    assert compile_enabled(None) and not compile_enabled(False)
    monkeypatch.delenv("PLM_ENGINE_COMPILE")
    assert not compile_enabled(None)  # off by default: the compile costs more than it saves in short runs


def test_batches_beyond_the_largest_bucket_run_eagerly(tiny, monkeypatch):
    """A decode batch larger than the compiled buckets runs the eager forward (no compile for it)."""
    eng = Engine(tiny, kv_cache_tokens=1024, max_num_seqs=4, compile=True)
    eng.runner.graphs.buckets = [1, 2]  # as if max_num_seqs were past CPU_MAX_BUCKET
    ref = Engine(tiny, kv_cache_tokens=1024, max_num_seqs=4, compile=False)
    prompts = [[3, 4], [5, 6, 7], [8], [9, 9]]
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    monkeypatch.setattr(CompiledDecode, "run", lambda *a, **k: pytest.fail("compiled path taken"))
    assert [o.token_ids for o in eng.generate(prompts, p)] == [o.token_ids for o in ref.generate(prompts, p)]


def test_threads_default_to_physical_cores(tiny, monkeypatch, keep_threads):
    cores = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    monkeypatch.delenv("PLM_ENGINE_NUM_THREADS", raising=False)
    assert cpu_threads() == cores and cpu_threads(3) == 3
    torch.set_num_threads(cores + 1)
    Engine(tiny, kv_cache_tokens=64, compile=False)
    assert torch.get_num_threads() == cores
    Engine(tiny, kv_cache_tokens=64, compile=False, num_threads=1)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("PLM_ENGINE_NUM_THREADS", "2")
    assert cpu_threads() == 2 and cpu_threads(1) == 1
    Engine(tiny, kv_cache_tokens=64, compile=False)
    assert torch.get_num_threads() == 2
    for bad in ("0", "two"):
        monkeypatch.setenv("PLM_ENGINE_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="PLM_ENGINE_NUM_THREADS"):
            cpu_threads()
    monkeypatch.delenv("PLM_ENGINE_NUM_THREADS")
    with pytest.raises(ValueError, match="num_threads"):
        Engine(tiny, kv_cache_tokens=64, compile=False, num_threads=0)


def test_failed_compile_warns_and_decodes_eagerly(tiny, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    prompts = [[3, 4, 5], [6, 7]]
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng = Engine(tiny, kv_cache_tokens=256, max_num_seqs=2, compile=True)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = eng.generate(prompts, p)
    assert eng.graphs.failed is not None
    ref = Engine(tiny, kv_cache_tokens=256, max_num_seqs=2, compile=False).generate(prompts, p)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_default_cache_size_is_round(tiny, monkeypatch):
    """The default KV cache (a share of free memory) is rounded down to three significant bits of blocks,
    so the compiled step (specialised to the cache size) is found in inductor's disk cache next start."""
    import plm_engine.generation.model_runner as mr

    per_token = 2 * tiny.config.n_layers * tiny.config.n_kv_heads * tiny.config.head_dim * 4
    sizes = []
    for free_tokens in (1000, 1013, 1100):
        monkeypatch.setattr(mr, "_available_cpu_bytes", lambda n=free_tokens: n * per_token * 10)
        sizes.append(Engine(tiny, compile=False, block_size=16).runner.num_blocks)
    assert sizes == [56, 56, 64]  # 62, 63 and 68 blocks fit

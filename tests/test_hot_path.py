"""The hot-path rule: a decode step, a prefill and a training step read no tensor value on the host.

On a GPU every such read (.item(), .tolist(), int(t), bool(t), nonzero, data-dependent shapes) is a full
synchronisation, an error under CUDA-graph capture and a graph break under torch.compile. Values are
checked where data enters instead (plm_engine/ops/checks.py). Proved here without a GPU, two ways:
a dispatch mode that fails on any host read while the forward runs, and torch.compile(fullgraph=True),
which cannot trace one.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plm_engine.layers.kv_cache import PagedBatch
from plm_engine.models.config import ModelConfig
from plm_engine.models.transformer import Transformer
from plm_engine.ops import checks

# aten ops that hand a tensor's value to Python or size an output by the data.
_HOST_READS = {
    torch.ops.aten._local_scalar_dense,  # .item(), int(t), float(t), bool(t)
    torch.ops.aten.nonzero,
    torch.ops.aten.masked_select,
    torch.ops.aten._unique2,
    torch.ops.aten.unique_consecutive,
    torch.ops.aten.equal,
}


class NoHostReads(TorchDispatchMode):
    """Fails on any read of a tensor value to the host (dispatched, or .tolist() / .numpy())."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _HOST_READS:
            raise AssertionError(f"host read of a tensor value in the hot path: {func}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy

        def refuse(*a, **k):
            raise AssertionError("host read of a tensor value in the hot path: tolist/numpy")

        torch.Tensor.tolist = torch.Tensor.numpy = refuse
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)


@contextlib.contextmanager
def production_checks():
    """The checks as users run them (the suite runs with PLM_ENGINE_DEBUG_CHECKS=1, which checks
    everything everywhere)."""
    prev = checks.set_debug(False)
    try:
        yield
    finally:
        checks.set_debug(prev)


def test_detector_catches_reads():
    x = torch.arange(4)
    for read in (lambda: int(x.max()), lambda: x.tolist(), lambda: x.nonzero(), lambda: bool(x.any())):
        with pytest.raises(AssertionError, match="host read"), NoHostReads():
            read()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny")).eval()


def _decode_batch(b=3):
    # Three sequences of 4, 21 and 9 cached tokens (the new token included), blocks of 16.
    lens = [4, 21, 9][:b]
    table = torch.tensor([[0, 5], [1, 2], [3, 4]][:b], dtype=torch.int32)
    slots = torch.tensor([table[i, (n - 1) // 16] * 16 + (n - 1) % 16 for i, n in enumerate(lens)])
    batch = PagedBatch(
        cu_seqlens=torch.arange(b + 1, dtype=torch.int32),
        max_seqlen=1,
        slot_mapping=slots,
        block_table=table,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32),
        is_decode=True,
        has_prefix=False,
    )
    return torch.tensor([5, 9, 11][:b]), torch.tensor(lens) - 1, batch


def _prefill_batch(prefix=(0, 0)):
    # Two prompts of 5 and 12 new tokens, packed, after `prefix` tokens already cached (chunked prefill).
    lens = [5, 12]
    ids = torch.randint(0, 512, (sum(lens),))
    pos = torch.cat([torch.arange(c, c + n) for n, c in zip(lens, prefix)])
    slots = torch.cat([p + 32 * blk for p, blk in zip(pos.split(lens), (0, 1))])
    batch = PagedBatch(
        cu_seqlens=torch.tensor([0, 5, 17], dtype=torch.int32),
        max_seqlen=12,
        slot_mapping=slots,
        block_table=torch.tensor([[0, 4], [2, 3]], dtype=torch.int32),
        cache_seqlens=torch.tensor([n + c for n, c in zip(lens, prefix)], dtype=torch.int32),
        is_decode=False,
        has_prefix=any(prefix),
        seq_bounds=(0, 5, 17),
    )
    return ids, pos, batch


@torch.no_grad()
def test_decode_and_prefill_read_nothing(llama):
    cache = llama.allocate_kv_cache(8, 16)
    with production_checks():
        for ids, pos, batch in (_prefill_batch(), _prefill_batch(prefix=(3, 9)), _decode_batch()):
            with checks.trusted(), NoHostReads():
                logits = llama.forward_tokens(ids, pos, cache, batch)
            assert torch.isfinite(logits).all()
        # Called directly (not from the engine), the model checks its inputs: that is a host read.
        ids, pos, batch = _decode_batch()
        with pytest.raises(AssertionError, match="host read"), NoHostReads():
            llama.forward_tokens(ids, pos, cache, batch)
        with pytest.raises(ValueError, match="out of range"):
            llama.forward_tokens(ids + 10_000, pos, cache, batch)


def test_training_step_reads_nothing():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny")).train()
    x = torch.randint(0, 512, (2, 16))
    with production_checks(), checks.trusted(), NoHostReads():
        loss = model(x, labels=x).loss
        loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_engine_step_forwards_read_nothing(llama, monkeypatch):
    """Through the engine: its model forwards (prefill and decode) run with no host read."""
    from plm_engine.generation.engine import Engine
    from plm_engine.generation.sampler import SamplingParams

    engine = Engine(llama, tokenizer=None, max_num_seqs=4, kv_cache_tokens=256, block_size=16, cuda_graphs=False)
    forward = llama.forward_tokens

    def guarded(*args, **kwargs):
        with NoHostReads():
            return forward(*args, **kwargs)

    monkeypatch.setattr(llama, "forward_tokens", guarded)
    with production_checks():
        outs = engine.generate(
            [list(range(5, 30)), list(range(7, 12))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        )
    assert [len(o.token_ids) for o in outs] == [6, 6]


@pytest.mark.parametrize("preset", ["bart-tiny", "t5-tiny"])
def test_seq2seq_engine_forwards_read_nothing(monkeypatch, preset):
    """Encoder-decoder models in the engine: the encoder pass, its cross-attention keys/values and the
    decoder's forwards (T5: relative position bias in the kernels, paged decode included) read no host
    value either."""
    from plm_engine.generation.engine import Engine
    from plm_engine.generation.sampler import SamplingParams
    from plm_engine.models.seq2seq import Seq2SeqTransformer

    torch.manual_seed(0)
    model = Seq2SeqTransformer(ModelConfig.preset(preset)).eval()
    engine = Engine(model, tokenizer=None, max_num_seqs=4, kv_cache_tokens=256, block_size=16, cuda_graphs=False)
    for name in ("encode", "cross_kv", "forward_tokens"):
        fn = getattr(model, name)

        def guarded(*args, _fn=fn, **kwargs):
            with NoHostReads():
                return _fn(*args, **kwargs)

        monkeypatch.setattr(model, name, guarded)
    with production_checks():
        outs = engine.generate(
            [list(range(5, 30)), list(range(7, 12))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        )
    assert [len(o.token_ids) for o in outs] == [6, 6]


def test_compile_fullgraph_decode_and_training_step(llama):
    """torch.compile(fullgraph=True) traces the decode forward and a training forward with no graph break,
    and computes what eager does."""
    torch._dynamo.reset()
    cache = llama.allocate_kv_cache(8, 16)
    ids, pos, batch = _decode_batch()

    def decode(ids, pos):
        with checks.trusted():
            return llama.forward_tokens(ids, pos, cache, batch)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(decode, fullgraph=True, backend="eager")(ids, pos), decode(ids, pos))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny")).train()
    x = torch.randint(0, 512, (2, 16))

    def loss_of(x):
        with checks.trusted():
            return model(x, labels=x).loss

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = loss_of(x)
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize(
    "objective, model",
    [
        ("clm", "gpt2-tiny"),
        ("mlm", "bert-tiny"),
        ("classify", "bert-tiny"),
        ("seq2seq", "bart-tiny"),
        ("seq2seq", "t5-tiny"),
    ],
)
def test_trainer_forward_backward_read_nothing(tmp_path, objective, model):
    """The trainer's micro-batch forward and backward, for every objective: its batches are checked and
    laid out on the host (padding layout, MLM label positions), so the step reads no device value."""
    import json

    from plm_engine.training.trainer import Trainer
    from tests.training.helpers import tiny_config, write_corpus

    if objective == "classify":
        rows = [
            {"text": " ".join(["king war crown"] * (1 + i % 3)), "label": ["comedy", "history"][i % 2]}
            for i in range(16)
        ]
        data = tmp_path / "rows.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows))
        cfg = tiny_config(
            tmp_path / "run",
            [str(data)],
            objective=objective,
            model=model,
            dataset="jsonl",
            seq_len=16,
            eval_fraction=0.25,
        )
    else:
        cfg = tiny_config(
            tmp_path / "run",
            write_corpus(str(tmp_path / "corpus"), n_files=1, lines=60),
            objective=objective,
            model=model,
        )
    trainer = Trainer(cfg)
    epoch, indices = trainer.sampler.next_batch()
    batch = trainer._collate(indices, epoch, trainer.train_set)
    if objective in ("classify", "seq2seq"):  # seq2seq: the noised sources differ in length
        assert "layout" in batch, "the test needs a padded batch"
    trainer.forward_module.train()
    with production_checks(), NoHostReads():
        loss, _, _ = trainer._loss(trainer.forward_module, batch)
        loss.backward()
    assert torch.isfinite(loss.detach())

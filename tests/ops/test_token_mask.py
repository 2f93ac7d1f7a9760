"""The token bitmask (structured output) on every backend against the reference: awkward vocabularies,
fp32/fp16/bf16, rows with and without a mask, strided views, every CPU ISA build, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

from plm_engine.ops import apply_token_bitmask_, extension
from plm_engine.ops.reference import apply_token_bitmask_ref
from plm_engine.ops.token_mask import bitmask_words
from tests.utils import DTYPES, device_backends

OP = "apply_token_bitmask_"
DEV_BACKENDS = device_backends(OP)
# 1 token, one short of / one past a word, a vocabulary spanning two Triton tiles (4096) with a
# ragged end, and SmolLM2's 49152.
VOCABS = [1, 31, 33, 4099, 49152]


def random_bitmask(m: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(m, words) int32 with every kind of word: all clear, all set, sparse, dense, random (with the
    sign bit), and random bits past the vocabulary in the last word (which must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    words = bitmask_words(vocab)
    bm = torch.randint(-(2**31), 2**31, (m, words), generator=g, dtype=torch.int64)
    kind = torch.randint(0, 5, (m, words), generator=g)
    bm = torch.where(kind == 0, 0, bm)
    bm = torch.where(kind == 1, -1, bm)
    bm = torch.where(kind == 2, 1 << torch.randint(0, 31, (m, words), generator=g), bm)
    bm = torch.where(kind == 3, ~(1 << torch.randint(0, 31, (m, words), generator=g)), bm)
    return bm.to(torch.int32)


def allowed_matrix(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(m, vocab) bool, decoded bit by bit in plain Python (the layout, independent of the reference)."""
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for i, row in enumerate(bitmask.tolist()):
        for j in range(vocab):
            out[i, j] = bool((row[j // 32] >> (j % 32)) & 1)
    return out


def test_reference_matches_the_bit_layout():
    vocab = 70
    bm = random_bitmask(3, vocab, seed=3)
    logits = torch.randn(4, vocab)
    out = apply_token_bitmask_ref(logits.clone(), bm, torch.tensor([2, 0, 2]))
    allowed = allowed_matrix(bm, vocab)
    expect = logits.clone()
    expect[0][~allowed[1]] = float("-inf")
    expect[2][~(allowed[0] & allowed[2])] = float("-inf")  # listed twice: the intersection
    assert torch.equal(out, expect)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("with_rows", [True, False], ids=["rows", "all"])
def test_matches_reference(device, backend, dtype, vocab, with_rows):
    n = 5
    logits = (torch.randn(n, vocab) * 4).to(device, dtype)
    if with_rows:
        rows = torch.tensor([3, 0, 4], device=device)  # rows 1 and 2 have no mask
        bm = random_bitmask(3, vocab, seed=vocab).to(device)
    else:
        rows, bm = None, random_bitmask(n, vocab, seed=vocab).to(device)
    before = logits.clone()
    out = apply_token_bitmask_(logits, bm, rows, backend=backend)
    assert out is logits  # in place
    expect = apply_token_bitmask_ref(before.clone(), bm, rows)
    assert torch.equal(logits, expect)
    if with_rows:
        assert torch.equal(logits[1:3], before[1:3]), "rows without a mask changed"
    # Allowed logits keep their exact bits; disallowed ones are -inf.
    keep = torch.isfinite(expect)
    assert torch.equal(logits[keep], before[keep]) and bool((logits[~keep] == float("-inf")).all())


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_strided_views_and_int32_rows(device, backend):
    vocab, words = 1000, bitmask_words(1000)
    wide = torch.randn(6, vocab + 24, device=device)
    logits = wide[:, 8 : 8 + vocab]  # row stride vocab + 24
    # The engine's packed host buffer: mask rows with extra columns beside them.
    packed = torch.cat([random_bitmask(2, vocab, seed=1), torch.zeros(2, 3, dtype=torch.int32)], 1).to(device)
    bm = packed[:, :words]
    rows = torch.tensor([5, 1], dtype=torch.int32, device=device)
    expect = apply_token_bitmask_ref(logits.clone(), bm, rows)
    outside = wide[:, :8].clone(), wide[:, 8 + vocab :].clone()
    apply_token_bitmask_(logits, bm, rows, backend=backend)
    assert torch.equal(logits, expect)
    assert torch.equal(wide[:, :8], outside[0]) and torch.equal(wide[:, 8 + vocab :], outside[1])


@pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_every_isa(cpu_isa, dtype):
    vocab = 2 * 32 * 16 + 7  # whole AVX-512 words plus a ragged end
    logits = torch.randn(7, vocab).to(dtype)
    bm = random_bitmask(7, vocab, seed=11)
    expect = apply_token_bitmask_ref(logits.clone(), bm)
    apply_token_bitmask_(logits, bm, backend="cpu")
    assert torch.equal(logits, expect), cpu_isa


@pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")
def test_cpu_kernel_many_rows_threads():
    # Enough rows to split over threads, with repeats: the intersection must not depend on the split.
    vocab = 3000
    logits = torch.randn(64, vocab)
    rows = torch.randint(0, 64, (200,))
    bm = random_bitmask(200, vocab, seed=5)
    expect = apply_token_bitmask_ref(logits.clone(), bm, rows)
    apply_token_bitmask_(logits, bm, rows, backend="cpu")
    assert torch.equal(logits, expect)


@pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")
def test_opcheck_cpu():
    from plm_engine.ops import backends

    backends.prepare(OP, "cpu")
    logits = torch.randn(3, 77)
    bm = random_bitmask(2, 77)
    torch.library.opcheck(torch.ops.plm_engine.apply_token_bitmask_.default, (logits, bm, torch.tensor([2, 0])))
    torch.library.opcheck(torch.ops.plm_engine.apply_token_bitmask_.default, (logits, random_bitmask(3, 77), None))


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_bad_input(device, backend):
    logits = torch.randn(3, 40, device=device)
    good = random_bitmask(3, 40).to(device)
    with pytest.raises(ValueError, match=r"bitmask must be int32 \(m, 2\)"):
        apply_token_bitmask_(logits, good[:, :1], backend=backend)
    with pytest.raises(ValueError, match="bitmask must be int32"):
        apply_token_bitmask_(logits, good.long(), backend=backend)
    with pytest.raises(ValueError, match="one row per logits row"):
        apply_token_bitmask_(logits, good[:2], backend=backend)
    with pytest.raises(ValueError, match="rows must be in"):
        apply_token_bitmask_(logits, good[:2], torch.tensor([0, 3], device=device), backend=backend)
    with pytest.raises(ValueError, match="rows must be"):
        apply_token_bitmask_(logits, good[:2], torch.tensor([0.0, 1.0], device=device), backend=backend)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        apply_token_bitmask_(logits.double(), good, backend=backend)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        apply_token_bitmask_(torch.randn(40, 3, device=device).t(), good, backend=backend)


@pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")
def test_cpu_kernel_checks_rows_itself():
    # Inside trusted() the Python value check is skipped; the C++ kernel still refuses a bad row.
    from plm_engine.ops import backends, checks

    backends.prepare(OP, "cpu")
    prev = checks.set_debug(False)
    try:
        with checks.trusted(), pytest.raises(RuntimeError, match="out of range"):
            apply_token_bitmask_(torch.randn(2, 40), random_bitmask(1, 40), torch.tensor([7]), backend="cpu")
    finally:
        checks.set_debug(prev)

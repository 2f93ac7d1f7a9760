"""report-kernels: every shipped GPU kernel compiles for sm_80/sm_90 without spilling, and the spill
detector catches a spilling kernel (Triton and CUDA)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess

import pytest

from plm_engine.ops import report
from plm_engine.ops.triton.spec import KernelSpec

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(report.cuobjdump_path() is None, reason="no cuobjdump (it ships in the triton wheel)")


@pytest.fixture(scope="module")
def triton_rows():
    """The Triton part of the report, compiled once for this module (a subprocess under the interpreter)."""
    return report.collect(report.ARCHS, include_cuda=False)


@pytest.mark.slow
def test_every_shipped_triton_kernel_compiles_without_spills(triton_rows):
    specs = [s for m in report.TRITON_MODULES for s in importlib.import_module(m).kernel_specs()]
    assert {r["kernel"] for r in triton_rows} == {s.name.partition("[")[0] for s in specs}
    # Every spec x arch x alignment variant it is launched under is there.
    variants = sum(len(set(s.alignments) & set(report.ALIGNMENTS)) for s in specs)
    assert len(triton_rows) == variants * len(report.ARCHS)
    assert {r["arch"] for r in triton_rows} == set(report.ARCHS)
    for r in triton_rows:
        where = f"{r['kernel']}[{r['config']}] sm_{r['arch']}"
        assert not r.get("error"), f"{where}: {r['error']}"
        assert r["registers"] > 0, where
        assert r["spill_bytes"] == 0, f"{where} spills: {r}"
    assert report.problems(triton_rows) == []


def test_kernel_specs_cover_every_launch_config():
    """The launcher and kernel_specs share launch_config: each block size's warps appear in a spec."""
    from plm_engine.ops.contracts.norms import TRITON_MAX_N
    from plm_engine.ops.triton import norms

    specs = norms.kernel_specs()
    assert len({s.name for s in specs}) == len(specs)
    shipped = {(s.fn, s.constexprs.get("BLOCK_N", s.constexprs.get("CHUNK")), s.num_warps) for s in specs}
    for log2 in range(TRITON_MAX_N.bit_length()):
        fwd, bwd = norms.launch_config("fwd", 1 << log2), norms.launch_config("bwd", 1 << log2)
        fwd_fn = norms._norm_fwd_long_kernel if fwd.long_row else norms._norm_fwd_kernel
        assert (fwd_fn, fwd.cols_per_program, fwd.num_warps) in shipped, fwd
        assert (norms._norm_bwd_kernel, bwd.cols_per_program, bwd.num_warps) in shipped, bwd
        if bwd.long_row:
            assert (norms._norm_bwd_coeffs_kernel, bwd.chunk, bwd.num_warps) in shipped, bwd


def test_cuda_extension_kernels_do_not_spill():
    rows = report.collect_cuda(report.ARCHS)
    notes = [r["note"] for r in rows if r.get("note")]
    if notes:
        pytest.skip("; ".join(notes))
    assert {r["arch"] for r in rows} == set(report.ARCHS)
    for r in rows:
        assert r["registers"] > 0, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} sm_{r['arch']} spills: {r}"


# ---- the detector itself ---------------------------------------------------------------------------


def _captured_section(arch: str, functions: str) -> str:
    """One architecture's part of `cuobjdump --dump-resource-usage` output."""
    header = f"Fatbin elf code:\n================\narch = {arch}\ncode version = [1,8]\nhost = linux\n"
    return f"\n{header}compile_size = 64bit\n\nResource usage:\n Common:\n  GLOBAL:0\n{functions}"


# Trimmed `cuobjdump --dump-resource-usage` of a shared object built with nvcc -maxrregcount=16 for
# sm_80 and sm_90a: heavy_kernel spills, the other two do not.
CAPTURED = _captured_section(
    "sm_80",
    """ Function _Z11smem_kernelPf:
  REG:10 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z12heavy_kernelPKfPfi:
  REG:24 STACK:608 SHARED:0 LOCAL:0 CONSTANT[0]:372 TEXTURE:0 SURFACE:0 SAMPLER:0
""",
) + _captured_section(
    "sm_90a",
    """ Function _Z12scale_kernelIfEvPKT_PS0_fi:
  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z12heavy_kernelPKfPfi:
  REG:24 STACK:584 SHARED:0 LOCAL:16 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
""",
)


def test_parser_reads_arch_sections_and_flags_spills():
    found = report.parse_resource_usage(CAPTURED)
    assert [(f["symbol"], f["arch"]) for f in found] == [
        ("_Z11smem_kernelPf", 80),
        ("_Z12heavy_kernelPKfPfi", 80),
        ("_Z12scale_kernelIfEvPKT_PS0_fi", 90),
        ("_Z12heavy_kernelPKfPfi", 90),
    ]
    assert found[0]["shared"] == 1024 and found[0]["registers"] == 10
    assert [report.spill_bytes(f) for f in found] == [0, 608, 0, 600]
    rows = [report._row("cuda", f["symbol"], "", f["arch"], f, f["shared"], None) for f in found]
    bad = report.problems(rows)
    assert len(bad) == 2 and all("heavy_kernel" in p for p in bad)
    # A bare cubin has no arch header: its functions take the arch it was compiled for.
    bare_cubin = CAPTURED.split("Fatbin elf code")[1].split("arch = sm_80")[1]
    assert report.parse_resource_usage(bare_cubin, default_arch=86)[0]["arch"] == 86


CUDA_SOURCE = r"""
template <typename T>
__global__ void scale_kernel(const T* x, T* y, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = T(float(x[i]) * s);
}
template __global__ void scale_kernel<float>(const float*, float*, float, int);

// 64 values live at once: under -maxrregcount=16 this has to spill.
__global__ void heavy_kernel(const float* __restrict__ x, float* __restrict__ y) {
  float v[64];
  int base = (blockIdx.x * blockDim.x + threadIdx.x) * 64;
#pragma unroll
  for (int k = 0; k < 64; ++k) v[k] = x[base + k];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 64; ++k) s += v[k] * v[(k * 7) % 64];
#pragma unroll
  for (int k = 0; k < 64; ++k) y[base + k] = v[k] * s + v[63 - k];
}
"""


def _nvcc() -> str | None:
    for cand in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_report_on_a_freshly_built_library(tmp_path):
    src, lib = tmp_path / "k.cu", tmp_path / "libk.so"
    src.write_text(CUDA_SOURCE)
    subprocess.run(
        [
            _nvcc(),
            "-shared",
            "-Xcompiler",
            "-fPIC",
            "-maxrregcount=16",
            "-gencode",
            "arch=compute_80,code=sm_80",
            "-gencode",
            "arch=compute_90a,code=sm_90a",
            "-o",
            str(lib),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    rows = report.collect_cuda(report.ARCHS, path=str(lib))
    by = {(r["kernel"].split("(")[0], r["arch"]): r for r in rows}
    assert set(by) == {(k, a) for k in ("heavy_kernel", "void scale_kernel<float>") for a in (80, 90)}, by.keys()
    for arch in (80, 90):
        assert by[("heavy_kernel", arch)]["spill_bytes"] > 0
        assert by[("void scale_kernel<float>", arch)]["spill_bytes"] == 0
    assert len(report.problems(rows)) == 2


def test_cuda_report_on_a_library_without_device_code(tmp_path):
    lib = tmp_path / "libplain.so"
    (tmp_path / "plain.c").write_text("int answer(void) { return 42; }\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "plain.c")], check=True)
    rows = report.collect_cuda(report.ARCHS, path=str(lib))
    assert len(rows) == 1 and "no CUDA kernels" in rows[0]["note"] and report.problems(rows) == []


# A deliberately spilling Triton configuration: a 16384-wide fp32 row kept live across a reduction
# by a single warp is 512 values per thread, twice the register file a thread can have.
@triton.jit
def _register_hog_kernel(X_ptr, Y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X_ptr + offs, mask=offs < n, other=0.0)
    tl.store(Y_ptr + offs, x - tl.sum(x, axis=0) / n, mask=offs < n)


def kernel_specs() -> list[KernelSpec]:
    """This module stands in for an op family in the spill test below."""
    return [
        KernelSpec(
            "register_hog[BLOCK=16384,fp32]",
            _register_hog_kernel,
            {"X_ptr": "*fp32", "Y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 16384},
            num_warps=1,
            num_stages=1,
        )
    ]


def test_spill_detector_flags_a_spilling_triton_kernel(capsys):
    # What `plm-engine report-kernels --json` runs, on this module's kernel_specs() only.
    status = report.report_kernels(True, archs=(80,), include_cuda=False, modules=[__name__], workers=1)
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(report.ALIGNMENTS)
    for r in rows:
        assert not r.get("error"), r
        assert r["kernel"] == "register_hog" and r["num_warps"] == 1 and r["arch"] == 80
        assert r["spill_bytes"] > 0, r
    assert status == 1
    assert len(report.problems(rows)) == len(rows)
    assert "PROBLEM: triton register_hog [BLOCK=16384,fp32,align16] sm_80: spills" in report.format_table(rows)

#!/usr/bin/env bash
# The CPU kernel benchmarks against PyTorch eager, once per instruction set, appending to
# benchmarks/results/*.csv (each row names the CPU, its flags, our kernels' ISA and the capping variables).
#
#   bash benchmarks/cpu_isa_suite.sh            # this CPU's best ISA, then AVX2
#   ISAS="avx2" bash benchmarks/cpu_isa_suite.sh
#
# "avx2" on an AVX-512 machine emulates an AVX2-only CPU for BOTH sides: our kernels
# (PLM_ENGINE_CPU_ISA) and PyTorch's own (ATen's DispatchStub, oneDNN and MKL), so a ratio against eager
# means what it would on such a CPU (same memory system; clock and cache sizes are this machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ISAS=${ISAS:-"native avx2"}
EXTRA=${EXTRA:-}  # e.g. --no-csv

run() { echo "+ $*"; "$@"; }

for isa in $ISAS; do
    case $isa in native|avx2) ;; *) echo "ISAS: native and avx2 only (got $isa)"; exit 2 ;; esac
    if [ "$isa" = native ]; then
        unset PLM_ENGINE_CPU_ISA ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA MKL_ENABLE_INSTRUCTIONS
    else
        export PLM_ENGINE_CPU_ISA=$isa ATEN_CPU_CAPABILITY=$isa
        export ONEDNN_MAX_CPU_ISA=${isa^^} MKL_ENABLE_INSTRUCTIONS=${isa^^}
    fi
    echo "=== $isa"
    run $PY benchmarks/bench_attention.py --device cpu --kinds dense --providers torch,cpu --dtypes fp32,bf16 \
        --modes fwd,fwd_bwd --causal causal,full --seqlens 512,1024,2048 --heads 8 $EXTRA
    run $PY benchmarks/bench_linear.py --rows 1,4,8 --dtypes fp32,bf16,fp16 $EXTRA
    run $PY benchmarks/bench_norms.py --device cpu --providers torch,cpu --dtypes fp32,bf16,fp16 $EXTRA
    run $PY benchmarks/bench_rope.py --device cpu --providers torch,cpu --dtypes fp32,bf16,fp16 $EXTRA
    run $PY benchmarks/bench_softmax.py --device cpu --providers torch,cpu --dtypes fp32,bf16,fp16 $EXTRA
    run $PY benchmarks/bench_activations.py --device cpu --providers torch,cpu --dtypes fp32,bf16,fp16 $EXTRA
    for dt in fp32 bf16; do
        run $PY benchmarks/bench_cross_entropy.py --device cpu --part speed --dtype $dt $EXTRA
    done
    run $PY benchmarks/bench_train.py --device cpu --precision fp32 $EXTRA
done

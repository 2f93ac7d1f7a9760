#!/usr/bin/env bash
# CI: every C++ CPU source of plm_engine._C (csrc/*.cpp, csrc/cpu/*.cpp; no CUDA) compiles for aarch64,
# so the Arm path (the NEON policy of csrc/cpu/simd.h, the generic:: builds of the kernels) cannot rot.
# Compile only: Debian's cross compiler against the x86 venv's torch headers, which are the same
# for both architectures. The Python headers are the host's: their pyconfig.h describes x86-64, which
# does not matter for a compile-only check (only pybind11 code reads it).
#
#   .ci/aarch64_compile.sh              # uses .venv/bin/python to find torch
#   PYTHON=/path/to/python .ci/aarch64_compile.sh
#
# Prints one line per file; exits non-zero if any file fails (its errors are printed after the list).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
if ! command -v "$CXX" > /dev/null; then
    echo "installing g++-aarch64-linux-gnu"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu > /dev/null \
        || { echo "could not install the aarch64 cross compiler"; exit 2; }
fi

PYTHON=${PYTHON:-.venv/bin/python}
read -r torch_dir py_include < <("$PYTHON" - <<'PY'
import os, sysconfig, importlib.util
spec = importlib.util.find_spec("torch")  # the package's location, without importing torch (slow)
print(os.path.realpath(os.path.dirname(spec.origin)), sysconfig.get_paths()["include"])
PY
) || { echo "cannot locate torch with $PYTHON"; exit 2; }

# The flags of setup.py's CPU build (C++20: torch's headers require it), for the Arm baseline;
# -Wno-psabi: GCC's note that aarch64 passes std::pair<float, float> differently since GCC 10 (ABI, not code).
flags=(-std=c++20 -O2 -fopenmp -fno-math-errno -Wall -Wno-unknown-pragmas -Wno-psabi -march=armv8-a
       -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       -Icsrc -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
       -isystem "$py_include")

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
# A few files at a time: each takes seconds to a minute (torch's headers).
njobs=${JOBS:-$(nproc)}
files=(csrc/*.cpp csrc/cpu/*.cpp)
for f in "${files[@]}"; do
    while (( $(jobs -rp | wc -l) >= njobs )); do wait -n; done
    (
        name=$(echo "$f" | tr / _)
        t0=$SECONDS
        if "$CXX" "${flags[@]}" -c "$f" -o /dev/null > "$log/$name.out" 2>&1; then
            echo "ok    $f ($((SECONDS - t0)) s)"
        else
            echo "FAIL  $f ($((SECONDS - t0)) s)"
            touch "$log/$name.failed"
        fi
    ) &
done
wait
failed=$(find "$log" -name '*.failed' | wc -l)

# The compiler's messages: errors of the failed files, warnings of the others.
for f in "${files[@]}"; do
    out="$log/$(echo "$f" | tr / _).out"
    if [[ -s "$out" ]]; then
        echo "---- $f"
        head -60 "$out"
    fi
done
echo "aarch64 compile: ${#files[@]} files, $failed failed, $((SECONDS - start)) s ($($CXX -dumpversion))"
exit $(( failed > 0 ))

#!/usr/bin/env bash
# The peer for benchmarks and reference fixtures: llama.cpp as vendored in the
# llama-cpp-python 0.3.36 sdist (a PyPI package), built here with -DGGML_NATIVE=ON.
#   bash scripts/build-llama-cpp.sh [DIR]     (DIR: ${LWM_PEER_DIR:-$HOME/.cache/lwm-peer})
# Prints the llama.cpp tree; its build/bin has llama-bench, llama-quantize, llama-server and
# the shared libggml-base/libggml-cpu that scripts/ggml_kernel_fixture.py loads.
# About 15-25 min on 2 cores; idempotent.
set -euo pipefail
dir="${1:-${LWM_PEER_DIR:-$HOME/.cache/lwm-peer}}"
ver=0.3.36
mkdir -p "$dir"
cd "$dir"
python3 -c "import scikit_build_core, cmake, ninja, numpy" 2>/dev/null ||
  python3 -m pip install --quiet scikit-build-core cmake ninja numpy
[ -f "llama_cpp_python-$ver.tar.gz" ] ||
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --no-build-isolation "llama-cpp-python==$ver"
[ -d "llama_cpp_python-$ver" ] || tar xzf "llama_cpp_python-$ver.tar.gz"
src="$dir/llama_cpp_python-$ver/vendor/llama.cpp"
cmake -S "$src" -B "$src/build" -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$src/build" -j "$(nproc)" --target ggml-cpu llama-bench llama-quantize llama-server
echo "$src"

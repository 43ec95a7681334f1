#!/usr/bin/env bash
# Build the llama.cpp peer (the one llama-cpp-python 0.3.36 vendors) from source.
#
#   bash scripts/build-llama-cpp.sh [DIR]      # DIR defaults to ${LWM_PEER_DIR:-$HOME/.cache/lwm-peer}
#
# Idempotent: installs the build tools (scikit-build-core, cmake, ninja, numpy) only when
# missing, downloads the sdist into DIR only when neither the tarball nor its extracted tree is
# there, configures only when the build folder is missing or was configured with other options,
# and lets ninja skip what is up to date. The build is native (-DGGML_NATIVE=ON), Release,
# without curl, with `-j ${JOBS:-2}`. Targets: llama-bench, llama-quantize, llama-server and
# llama-cli (when this llama.cpp has it).
#
# Prints the binaries, the LLaMA-2 vocabulary GGUF (models/ggml-vocab-llama-spm.gguf, read by
# scripts/make_bench_model.py) and the gguf-py folder (llama.cpp's own GGUF writer).
#
# Environment: PYTHON (default python3), JOBS (default 2), LLAMA_CPP_PYTHON_VERSION (default 0.3.36).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${1:-${LWM_PEER_DIR:-$HOME/.cache/lwm-peer}}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-2}"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SDIST="$DIR/llama_cpp_python-$VERSION"
TARBALL="$SDIST.tar.gz"
SRC="$SDIST/vendor/llama.cpp"
BUILD="$SRC/build"

log() { echo "[build-llama-cpp] $*" >&2; }

# 1. Build tools, only the missing ones.
missing=()
"$PY" -c 'import scikit_build_core' 2>/dev/null || missing+=(scikit-build-core)
command -v cmake >/dev/null 2>&1 || "$PY" -c 'import cmake' 2>/dev/null || missing+=(cmake)
command -v ninja >/dev/null 2>&1 || "$PY" -c 'import ninja' 2>/dev/null || missing+=(ninja)
"$PY" -c 'import numpy' 2>/dev/null || missing+=(numpy)
if ((${#missing[@]})); then
    log "pip install ${missing[*]}"
    "$PY" -m pip install "${missing[@]}"
fi
# pip's cmake/ninja wheels put their commands next to the interpreter.
PATH="$PATH:$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH

# 2. The sdist (llama.cpp is vendored inside it).
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    if [[ ! -f "$TARBALL" ]]; then
        log "downloading llama-cpp-python==$VERSION (sdist) into $DIR"
        "$PY" -m pip download --no-deps --no-binary llama-cpp-python --no-build-isolation \
            -d "$DIR" "llama-cpp-python==$VERSION"
    fi
    log "extracting $TARBALL"
    tar -xzf "$TARBALL" -C "$DIR"
fi
[[ -f "$SRC/CMakeLists.txt" ]] || { log "no llama.cpp in $SRC"; exit 1; }

# 3. Configure (again only if the cache's options differ from these).
configured() {
    local cache="$BUILD/CMakeCache.txt"
    [[ -f "$BUILD/build.ninja" && -f "$cache" ]] || return 1
    grep -q '^GGML_NATIVE:BOOL=ON$' "$cache" &&
        grep -Eq '^LLAMA_CURL:[A-Z]+=OFF$' "$cache" &&
        grep -q '^CMAKE_BUILD_TYPE:STRING=Release$' "$cache" &&
        grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$cache"
}
if ! configured; then
    log "configuring $BUILD"
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
fi

# 4. Build.
targets=(llama-bench llama-quantize llama-server)
# (the list is read whole first: `ninja | grep -q` would fail under pipefail when grep
# exits early and ninja gets SIGPIPE)
all_targets="$(ninja -C "$BUILD" -t targets all 2>/dev/null || true)"
if grep -q '^llama-cli:' <<<"$all_targets"; then
    targets+=(llama-cli)
else
    log "this llama.cpp has no llama-cli target; skipping it"
fi
log "building ${targets[*]} with -j $JOBS"
cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}"

# 5. Where things are.
for t in "${targets[@]}"; do
    [[ -x "$BUILD/bin/$t" ]] || { log "missing $BUILD/bin/$t after the build"; exit 1; }
    echo "$t: $BUILD/bin/$t"
done
echo "vocab: $SRC/models/ggml-vocab-llama-spm.gguf"
echo "gguf-py: $SRC/gguf-py"
echo "peer-dir: $DIR"

#!/usr/bin/env bash
# Run the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) for a while each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Defaults: 60 s, every target. Installs cargo-fuzz when it is missing. Works on the stable
# toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags (-Zsanitizer=address,
# the coverage instrumentation); see docs/fuzz.md. Each target starts from its committed
# seeds (fuzz/seeds/TARGET) and keeps what it finds in fuzz/corpus/TARGET (not committed);
# a crash leaves its input in fuzz/artifacts/TARGET and makes the script exit non-zero.
# Builds are optimized with debug assertions and overflow checks on (`-O -a`: without -a an
# overflow wraps silently and std's unsafe-precondition checks are off). FUZZ_SANITIZER
# (default address; "none" misses memory errors in C code such as onig's) and FUZZ_PROFILE
# (release, the default, or dev: unoptimized, ~10x fewer executions) pick the build; extra
# libFuzzer flags go in FUZZ_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
all=(gguf server_request jax_msgpack safetensors tokenizer vqgan_pickle)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
sanitizer="${FUZZ_SANITIZER:-address}"
case "${FUZZ_PROFILE:-release}" in
  release) profile="-O -a" ;;
  dev) profile=--dev ;;
  *) echo "FUZZ_PROFILE must be release or dev" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

echo "== building the fuzz targets (sanitizer: $sanitizer, profile: ${FUZZ_PROFILE:-release})"
cargo fuzz build $profile --sanitizer "$sanitizer"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="$(mktemp)"
  echo "== $t: ${secs} s"
  set +e
  # shellcheck disable=SC2086
  cargo fuzz run $profile --sanitizer "$sanitizer" "$t" "$PWD/fuzz/corpus/$t" "$PWD/fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -dict="$PWD/fuzz/dict" \
    -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  execs=$(awk '/^stat::number_of_executed_units/ { v = $NF } END { print v }' "$log")
  rate=$(awk '/^stat::average_exec_per_sec/ { v = $NF } END { print v }' "$log")
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  if [ "$rc" -ne 0 ]; then
    grep -E -A3 'panicked|ERROR|SUMMARY' "$log" | head -40
    tail -25 "$log"
    echo "$t: FAILED (exit $rc) after ${execs:-?} executions; input in fuzz/artifacts/$t/"
    failed+=("$t")
  else
    echo "$t: ${execs:-?} executions (${rate:-?}/s), corpus $corpus files, no crash"
  fi
  rm -f "$log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"

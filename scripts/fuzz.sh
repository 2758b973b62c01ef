#!/usr/bin/env bash
# Runs ax's fuzz targets (fuzz/, cargo-fuzz + libFuzzer) for a bounded time
# each, starting from the corpus committed under fuzz/corpus/<target>/:
#
#   frame        the control socket's frame decoder (ax_proto)
#   sockaddr     the broker's sockaddr_in/in6 parser and encoder
#   socket_name  the broker's abstract socket names
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer=address); on the
# stable toolchain they are unlocked with RUSTC_BOOTSTRAP=1.
#
# Installs cargo-fuzz when missing; if that (or fetching the fuzz crate's
# dependencies) fails for lack of network, prints a SKIP line and exits 0.
# Exits non-zero if a target finds a crash (panic, failed property, leak,
# timeout, out-of-memory) or does not build. Prints one summary line per
# target. The committed corpus is only read: inputs found during the run go
# to a temporary directory, crashing inputs to fuzz/artifacts/<target>/.
#
# Environment: AX_FUZZ_SECONDS (default 20): how long each target runs; the
# targets run in parallel. Arguments: the targets to run (default: all).
#
# Growing the committed corpus (kept under 200 files a target) after a
# longer run, and rewriting the seeds (fuzz/corpus/*/seed-*):
#   RUSTC_BOOTSTRAP=1 cargo fuzz run frame /tmp/frame fuzz/corpus/frame -- -max_total_time=600
#   fuzz/minimize.sh frame 180 /tmp/frame
#   cargo run --manifest-path fuzz/Cargo.toml -p ax-fuzz-seeds
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS=${AX_FUZZ_SECONDS:-20}
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=(frame sockaddr socket_name)
fi
export RUSTC_BOOTSTRAP=1

WORK=$(mktemp -d /tmp/ax-fuzz.XXXXXX)
PIDS=()
cleanup() {
    # Each run is its own process group (setsid): stop what is left of ours.
    for pid in "${PIDS[@]}"; do
        [ -n "$pid" ] || continue
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Cargo's messages when the registry cannot be reached.
NO_NETWORK='[Cc]ould(n.t| not) resolve|failed to (download|query|fetch|update)|network|[Cc]onnection (refused|reset|timed out)|Timeout was reached|offline mode|SSL connect|unable to get packages'

# Runs "$@" (a cargo command that needs the registry), logging to $WORK/net.log;
# on failure exits 0 with a SKIP line if the cause is the network, else 1.
need_network() { # what cmd...
    local what=$1
    shift
    if "$@" >"$WORK/net.log" 2>&1; then
        return 0
    fi
    cat "$WORK/net.log" >&2
    if grep -qE "$NO_NETWORK" "$WORK/net.log"; then
        echo "SKIP fuzz: $what failed for lack of network"
        echo "test result: ok. 0 passed; 0 failed (fuzz targets skipped)"
        exit 0
    fi
    echo "fuzz.sh: $what failed" >&2
    exit 1
}

start=$(date +%s)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    # A debug build: it only drives cargo, and builds in about half the time.
    need_network "cargo install cargo-fuzz" cargo install cargo-fuzz --locked --debug
    echo "cargo-fuzz installed in $(($(date +%s) - start)) s"
fi
cargo fuzz --version

need_network "fetching the fuzz crate's dependencies" \
    cargo fetch --manifest-path fuzz/Cargo.toml
t0=$(date +%s)
# One build for all targets; `cargo fuzz run` below then finds them built.
if ! cargo fuzz build >"$WORK/build.log" 2>&1; then
    tail -n 60 "$WORK/build.log" >&2
    echo "fuzz.sh: building the fuzz targets failed" >&2
    exit 1
fi
echo "fuzz targets built in $(($(date +%s) - t0)) s"

# The targets run side by side (libFuzzer uses one core each), so the step
# takes AX_FUZZ_SECONDS however many targets there are.
for t in "${TARGETS[@]}"; do
    mkdir -p "$WORK/corpus-$t"
    echo "fuzzing $t for ${SECS} s"
    # -timeout: an input taking 10 s is a hang; -malloc_limit_mb: one
    # allocation above 64 MiB is a bug for inputs of at most 4 KiB.
    setsid cargo fuzz run "$t" "$WORK/corpus-$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECS" -timeout=10 -malloc_limit_mb=64 \
        -print_final_stats=1 >"$WORK/$t.log" 2>&1 &
    PIDS+=($!)
done

PASSED=0
FAILED=0
SUMMARY=()
for i in "${!TARGETS[@]}"; do
    t=${TARGETS[$i]}
    log="$WORK/$t.log"
    rc=0
    wait "${PIDS[$i]}" || rc=$?
    PIDS[i]=""
    runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n 1 || true)
    if [ "$rc" -eq 0 ] && [ -n "$runs" ]; then
        PASSED=$((PASSED + 1))
        SUMMARY+=("$(printf 'fuzz %-13s ok, %s, %s, no crash' "$t:" "$runs" "${cov:-no stats}")")
    else
        FAILED=$((FAILED + 1))
        echo "---- fuzz $t: last lines of its log ----" >&2
        tail -n 80 "$log" >&2
        artifact=$(sed -n 's/.*Test unit written to \([^ ]*\).*/\1/p' "$log" | tail -n 1)
        if [ -n "$artifact" ] && [ -f "$artifact" ]; then
            echo "crashing input ($artifact), hex:" >&2
            od -An -tx1 -v "$artifact" | head -n 64 >&2
            echo "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $t $artifact" >&2
        fi
        SUMMARY+=("$(printf 'fuzz %-13s FAILED (exit %s)%s' "$t:" "$rc" "${artifact:+, input $artifact}")")
    fi
done

for line in "${SUMMARY[@]}"; do
    echo "$line"
done
echo "fuzz.sh: done in $(($(date +%s) - start)) s"
# In libtest's words, so that test.sh's tally counts one test per target.
if [ "$FAILED" -eq 0 ]; then
    echo "test result: ok. $PASSED passed; 0 failed (fuzz targets)"
    exit 0
fi
echo "test result: FAILED. $PASSED passed; $FAILED failed (fuzz targets)"
exit 1

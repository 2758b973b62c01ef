#!/usr/bin/env bash
# Rewrites the committed corpus of one fuzz target, fuzz/corpus/TARGET/, as
# its seed-* files plus other inputs, MAX files in all (default 180), chosen
# from the corpus and the extra directories (e.g. a long run's output)
# greedily, each adding the most edges not yet covered. `cargo fuzz cmin` keeps every
# input that adds anything in size order, which for `frame` means hundreds
# of one-edge files; this keeps the corpus small and reviewable.
#
#   RUSTC_BOOTSTRAP=1 cargo fuzz run frame /tmp/frame-run fuzz/corpus/frame -- -max_total_time=600
#   fuzz/minimize.sh frame 180 /tmp/frame-run
#
# Environment: RUSTC_BOOTSTRAP=1 is set for the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
t=${1:?usage: fuzz/minimize.sh TARGET [MAX [DIR...]]}
max=${2:-180}
shift $(($# < 2 ? $# : 2))
export RUSTC_BOOTSTRAP=1
cargo fuzz build "$t"
bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release/$t"
work=$(mktemp -d /tmp/ax-fuzz-min.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 1. A plain merge drops what adds nothing at all.
mkdir "$work/pool"
cp fuzz/corpus/"$t"/seed-* "$work/pool/"
"$bin" -merge=1 -use_counters=0 "$work/pool" "fuzz/corpus/$t" "$@" >"$work/merge.log" 2>&1 ||
    { cat "$work/merge.log" >&2; exit 1; }

# 2. Each candidate's own edges (a merge in one process only reports the
#    edges no earlier input had), one process per input.
for f in "$work"/pool/*; do
    rm -rf "$work/in" "$work/out" "$work/ctl"
    mkdir "$work/in" "$work/out"
    cp "$f" "$work/in/"
    "$bin" -merge=1 -use_counters=0 -merge_control_file="$work/ctl" \
        "$work/out" "$work/in" >/dev/null 2>&1
    echo "$f $(sed -n 's/^FT [0-9]* //p' "$work/ctl")" >>"$work/features"
done

# 3. Seeds first, then greedy set cover up to MAX files in all.
find "fuzz/corpus/$t" -type f ! -name 'seed-*' -delete
python3 - "$work/features" "fuzz/corpus/$t" "$max" <<'PY'
import hashlib, os, shutil, sys
features_file, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
ft = {}
for line in open(features_file):
    path, *feats = line.split()
    ft[path] = set(map(int, feats))
total = set().union(*ft.values())
covered = set()
for path in ft:
    if os.path.basename(path).startswith("seed-"):
        covered |= ft[path]
seeded = len(covered)
seeds = sum(os.path.basename(p).startswith("seed-") for p in ft)
chosen = 0
while seeds + chosen < limit:
    best = max(ft, key=lambda p: (len(ft[p] - covered), -os.path.getsize(p)))
    if not ft[best] - covered:
        break
    covered |= ft[best]
    data = open(best, "rb").read()
    shutil.copy(best, os.path.join(out, hashlib.sha1(data).hexdigest()))
    chosen += 1
print(f"{out}: seeds cover {seeded} of {len(total)} edges; "
      f"{chosen} more inputs bring it to {len(covered)}")
PY

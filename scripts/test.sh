#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: creates the pinned Python environment (cached
# outside the clone), generates the torchvision / pycocotools reference fixtures, then runs
# `cargo test --release`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="$(bash scripts/venv.sh)"
fixtures="${RETINANET_FIXTURES:-$PWD/target/fixtures}"
export RETINANET_FIXTURES="$fixtures"

# Regenerate a fixture set only when its script or the pinned requirements changed.
# Usage: make_fixtures SCRIPT OUT [REQUIREMENTS PYTHON]
make_fixtures() {
  local script="$1" out="$fixtures/$2" req="${3:-scripts/requirements.txt}" python="${4:-$py}"
  local stamp
  stamp="$(cat "scripts/$script" scripts/fixture_common.py "$req" | sha256sum | cut -c1-16)"
  if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "generating $out with scripts/$script" >&2
    rm -rf "$out"
    "$python" "scripts/$script" "$out"
    echo "$stamp" > "$out/.stamp"
  fi
}
make_fixtures make_parity_fixtures.py parity
make_fixtures make_train_fixtures.py train
make_fixtures make_scratch_fixtures.py train_scratch
if [ -f scripts/make_eval_fixtures.py ]; then
  make_fixtures make_eval_fixtures.py eval
fi
# DeepForest 2.1.0 in a venv of its own (its pins conflict with requirements.txt); the
# round-trip test runs it too.
dfreq=scripts/requirements-deepforest.txt
RETINANET_DEEPFOREST_PYTHON="$(bash scripts/venv.sh "$dfreq")"
export RETINANET_DEEPFOREST_PYTHON
make_fixtures make_deepforest_fixtures.py deepforest "$dfreq" "$RETINANET_DEEPFOREST_PYTHON"

# Tests that cannot run their checks here (a CPU feature missing) say so in this file.
skipped=target/skipped-tests.txt
rm -f "$skipped"
# The fuzz harness (tests/fuzz.rs) and the kill/resume test report their figures here.
reports=(target/fuzz-report.txt target/kill-report.txt)
rm -f "${reports[@]}"
status=0
cargo test --release "$@" || status=$?
for report in "${reports[@]}"; do
  if [ -s "$report" ]; then cat "$report" >&2; fi
done
if [ -s "$skipped" ]; then
  echo "Tests that skipped their checks on this machine:" >&2
  sort -u "$skipped" >&2
fi
exit "$status"

#!/usr/bin/env bash
# Creates (once) the Python environment the reference scripts need and prints its python.
# The venv is cached outside the clone, keyed by the requirements file, so CI reruns are fast.
# Usage: venv.sh [REQUIREMENTS]   (default: scripts/requirements.txt; DeepForest's venv:
# scripts/requirements-deepforest.txt)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="${1:-$here/requirements.txt}"
key="$(sha256sum "$req" | cut -c1-16)"
root="${RETINANET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retinanet}"
venv="$root/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  mkdir -p "$root"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"

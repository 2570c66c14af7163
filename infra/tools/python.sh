#!/usr/bin/env bash
# The Python tools the tests use, in a venv of their own: target/tools/venv.
#
#   infra/tools/python.sh     makes the venv and installs the pinned tools if missing
#                             or at another version; prints the venv's path
#
# Idempotent and quick when the venv is there at the pinned versions (no
# network then). Only Python 3 and its venv module are needed
# (Debian: apt-get install python3-venv).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=$repo/target/tools/venv
# Pinned: a new release may add checks or change its CLI; move the pin on purpose.
schemathesis_version=4.32.5

installed() {
  [ -x "$venv/bin/python" ] &&
    [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" \
      = "$schemathesis_version" ]
}

if ! installed; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "python.sh: python3's venv module is missing: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$venv")"
  # Serialized: parallel callers (tests) would otherwise build one venv twice at once.
  exec 9>"$repo/target/tools/.venv.lock"
  flock 9
  if ! installed; then
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "schemathesis==$schemathesis_version" >&2
    installed || { echo "python.sh: schemathesis $schemathesis_version did not install" >&2; exit 1; }
  fi
fi
echo "$venv"

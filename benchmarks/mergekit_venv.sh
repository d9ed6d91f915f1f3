#!/usr/bin/env bash
# Install mergekit in its own venv (bench-out/mergekit-venv by default) so that
# bench_apply.py can time its task_arithmetic on the same trio. Kept apart from
# .venv because mergekit pins its own versions of transformers and friends.
# torch is pinned first: a bare `torch` requirement pulls a 5 GB CUDA build here.
set -euo pipefail
VENV=${1:-bench-out/mergekit-venv}
TORCH=${TORCH:-torch==2.13.0}
MERGEKIT=${MERGEKIT:-mergekit==0.1.5}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/mergekit-yaml" ]; then
    echo "mergekit already installed in $VENV"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q $TORCH
"$VENV/bin/pip" install -q $MERGEKIT $TORCH
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit installed in $VENV"

#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py): tests/gpu, then (a) fused vs naive log-prob + entropy,
# (b) a forkrl RL step of a Qwen3-0.6B-shaped model, (c) the same step with TRL; one JSON file.
#
#   benchmarks/gpu_check.sh [OUT.json | OUT_DIR]     # default: $GPU_CHECK_OUT/ or runs/
#   benchmarks/gpu_check.sh --small                  # tiny shapes, any device: a smoke run
#
# No network: forkrl runs from this tree (PYTHONPATH=src) on the machine's own python3 ($PYTHON to
# choose another), and nothing comes from a registry. Wheels the machine lacks (TRL and its
# dependencies for (c), pytest) travel in benchmarks/.whl/; when that folder exists they are
# unpacked with `pip install --no-deps --no-index` into a scratch directory on PYTHONPATH, so the
# system's packages are left as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s)}"  # the 8-minute budget includes the wheels
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=benchmarks/.whl
if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="$(mktemp -d -t forkrl_gpu_check_site.XXXXXX)"
  echo "gpu_check: unpacking $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  PIP=("$PY" -m pip install --quiet --no-deps --no-index --disable-pip-version-check --target "$SITE")
  if ! "${PIP[@]}" "$WHEELS"/*.whl; then
    # One wheel built for another Python or platform must not cost the rest: install them one by one.
    for wheel in "$WHEELS"/*.whl; do
      "${PIP[@]}" "$wheel" || echo "gpu_check: could not install $wheel on $("$PY" -V 2>&1); left out"
    done
  fi
  export PYTHONPATH="$PYTHONPATH:$SITE"
else
  echo "gpu_check: no $WHEELS/*.whl: using only what $PY has (part (c) needs TRL)"
fi
export TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# The GPU check on a machine without network: bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py args]
# Run it in a copy of the repo holding .gpu_check/ (made on a box with PyPI by
# `python benchmarks/gpu_check.py --prepare .gpu_check`). Installs the carried wheels (deepspeed,
# pydantic, hjson, ...) into /tmp/site without network or dependencies, then runs the check; the
# exit code is the check's (0 = every section passed). Results: OUT_DIR/gpu_check.{json,log}.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
shift || true
inputs="${GPU_CHECK_INPUTS:-.gpu_check}"
python="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-/tmp/site}"
if ls "$inputs"/whl/*.whl >/dev/null 2>&1; then
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$inputs"/whl/*.whl; then
    # no usable pip: a wheel is a zip of the installed files
    echo "gpu_check.sh: pip install failed; unpacking the wheels into $site instead" >&2
    "$python" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$site" "$inputs"/whl/*.whl
  fi
else
  echo "gpu_check.sh: no wheels in $inputs/whl (prepared with --no-wheels?)" >&2
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"
exec "$python" benchmarks/gpu_check.py --inputs "$inputs" --output "$out" "$@"

#!/usr/bin/env bash
# tools/torch_floor.sh: does the package still work on an older torch? Not run in CI (slow, big
# downloads): run it by hand before changing the torch bound in pyproject.toml.
#
#   tools/torch_floor.sh [--venv DIR] VERSION [PYTEST_ARGS...]
#   tools/torch_floor.sh 2.7.1                                # fast tier, venv in a temp dir
#   tools/torch_floor.sh --venv /tmp/t241 2.4.1 tests/test_resume.py -x
#
# Makes a venv (DIR, or a fresh temp dir; an existing DIR that already has this torch is reused),
# installs torch==VERSION first, then this package and its [dev] test requirements under a constraint
# that pins the torch just installed, so pip cannot up- or downgrade it to satisfy something else.
# Then runs the fast test tier from the repository root: python -m pytest -q -m "not slow and not scale"
# (scale is pyproject's own deselection, which a -m on the command line would otherwise replace),
# plus PYTEST_ARGS (files, -k, -x...). TORCH_FLOOR_EXTRAS=ray,plots picks other extras than dev.
#
# Beware: PyPI's x86_64 wheels of old torch releases are CUDA builds, about 0.8 GB plus about 2.5 GB
# of nvidia-* packages per venv (they run on a CPU-only machine all the same). Needs python3 >= 3.10.
set -euo pipefail

usage() { sed -n '4,7p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }

venv=""
if [[ ${1:-} == --venv ]]; then
    [[ $# -ge 2 ]] || usage
    venv=$2
    shift 2
fi
[[ $# -ge 1 && $1 != -* ]] || usage
version=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -n $venv ]] || venv=$(mktemp -d "${TMPDIR:-/tmp}/torch-floor-$version.XXXXXX")
py="$venv/bin/python"

[[ -x $py ]] || python3 -m venv "$venv"
# the installed distribution's version, which pip compares: PyPI's 2.4.1 is "2.4.1" there although
# torch.__version__ says 2.4.1+cu121 (a pin on that fails to resolve); a local CPU build is "2.13.0+cpu"
installed() { "$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true; }
# torch first, so that its own dependencies (the CUDA ones included) come with it
case $(installed) in
    "$version" | "$version"+*) echo "torch_floor: reusing torch $(installed) in $venv" ;;
    *) "$py" -m pip install "torch==$version" ;;
esac
torch_version=$(installed)
"$py" -c 'import torch' || { echo "torch_floor: torch $version does not import in $venv" >&2; exit 1; }

# pinned to exactly that version: the package's own dependencies (torchmetrics, the extras) may not
# move it; pip fails instead, naming the package that wants another torch
constraints="$venv/torch-floor-constraints.txt"
echo "torch==$torch_version" > "$constraints"
"$py" -m pip install -c "$constraints" -e "$repo[${TORCH_FLOOR_EXTRAS:-dev}]"
after=$(installed)
[[ $after == "$torch_version" ]] || { echo "torch_floor: pip changed torch $torch_version -> $after" >&2; exit 1; }

"$py" -c 'import numpy, torch; print(f"torch_floor: torch {torch.__version__}, numpy {numpy.__version__}")'
cd "$repo"
exec "$py" -m pytest -q -m "not slow and not scale" "$@"

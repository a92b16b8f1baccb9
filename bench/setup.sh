#!/usr/bin/env bash
# The benchmark environment: its own virtual env with the package AND its peers (Lightning,
# torchkeras + accelerate), which are never dependencies of the package itself.
#   bash bench/setup.sh            -> .bench-venv/ at the repo root
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .bench-venv/bin/python ]] || python3 -m venv .bench-venv
. .bench-venv/bin/activate
pip install -q torch==2.13.0                    # first: the CPU build; nothing below may pull another
pip install -q -e ".[dev]"
pip install -q -r bench/requirements.txt
python -c "import torch, lightning, torchkeras, launcher; print('bench env: torch', torch.__version__, '| lightning', lightning.__version__, '| torchkeras', torchkeras.__version__)"

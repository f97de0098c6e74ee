#!/usr/bin/env bash
# One device call of a GPU session (DEVELOPERS.md, issue 6): make the package importable, run
# the recipe sweep on the GPU, leave the shipped parts, card, sweep.json and log in $OUT.
#
#   bash train/gpu_session.sh TASK BUDGET_MIN [more train.sweep flags]
#
# Run from the repository root with the data carried in .data/msl.tgz (`make device-data`) or
# .data/msl. Later flags win, so `--set device=cpu --set limit=16 ...` rehearses the call here
# (tests/test_gpu_session.py). Environment: OUT (required), MARS_DATA (.data/msl), PY (python3),
# RUNS (/tmp/runs), WORKERS (16).
set -eo pipefail
task=${1:?usage: bash train/gpu_session.sh TASK BUDGET_MIN [flags]}
budget=${2:?usage: bash train/gpu_session.sh TASK BUDGET_MIN [flags]}
shift 2
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PY:-python3}
mkdir -p "$OUT"
log=$OUT/log.txt

{
    echo "gpu_session: task $task, budget $budget min, $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
} | tee "$log"

# `make device-data` packs the data set into .data/msl.tgz (the device tool refused the folder)
if [ -z "${MARS_DATA:-}" ] && [ -f .data/msl.tgz ] && [ ! -d .data/msl ]; then
    mkdir -p .data/msl.tmp
    # checked here: set -e passes over a failure inside an && list (a damaged archive was
    # logged as unpacked, and the sweep then asked for a download)
    if ! tar -xzf .data/msl.tgz -C .data/msl.tmp 2>&1 | tee -a "$log"; then
        echo "gpu_session: cannot unpack .data/msl.tgz (make device-data again)" | tee -a "$log"
        exit 1
    fi
    mv .data/msl.tmp .data/msl
    echo "unpacked .data/msl.tgz into .data/msl" | tee -a "$log"
fi
export PYTHONUNBUFFERED=1 MARS_DATA=${MARS_DATA:-$PWD/.data/msl}

# The GPU machine has torch, torchvision, numpy, Pillow, click and matplotlib but no internet:
# install the package alone; if pip cannot, put the stage folders on the path instead.
# An install that pip reports done but that does not import takes the fallback too.
importable() { "$PY" -c "import marsvision.train.sweep" 2>/dev/null; }
if ! importable; then
    if ! { "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.txt" 2>&1 \
        && importable; }; then
        # the cause (a build's is an exception line far above pip's closing hints; e.g.
        # setuptools < 77 refuses the license string), then pip's own last lines
        { grep -E '[A-Za-z]+(Error|Exception): ' "$OUT/pip.txt" | tail -n 1 || true
          tail -n 2 "$OUT/pip.txt"; } | tee -a "$log"  # no such line: pipefail ended the call
        site=${TMPDIR:-/tmp}/mv
        mkdir -p "$site/marsvision"
        for stage in train export runtime benchmarks; do ln -sfn "$PWD/$stage" "$site/marsvision/$stage"; done
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    rm -f "$OUT/pip.txt"
fi
"$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch',
    torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$log"

"$PY" -m marsvision.train.sweep --task "$task" --budget-min "$budget" --set device=cuda \
    --workers "${WORKERS:-16}" --runs "${RUNS:-/tmp/runs}" --out "$OUT" "$@" 2>&1 | tee -a "$log"

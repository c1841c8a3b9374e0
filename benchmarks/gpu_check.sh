#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): adapters at the paper's shapes, VCE at CLIP ViT-L/14-336,
# a stage-2 step loop on LLaVA-1.5-7B in bf16; one JSON summary on standard output.
#
# The GPU machine needs torch, transformers, peft and safetensors. What else the code imports
# (pydantic, pydantic-core, annotated-types, typing-inspection, PyYAML, Pillow) is installed from
# wheels in benchmarks/wheels (or $DUET_WHEELS) into a temporary folder when missing; `make gpu-wheels`
# downloads them for CPython 3.11 on x86-64 Linux. Ray, MLflow and DeepSpeed are never needed.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--only adapters,vce,step_loop] [--out DIR] [--peak-tflops N]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${DUET_WHEELS:-benchmarks/wheels}

if ! "$PYTHON" -c "import pydantic, yaml, PIL" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        SITE=$(mktemp -d)
        trap 'rm -rf "$SITE"' EXIT
        "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >&2
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: pydantic, PyYAML or Pillow is missing and $WHEELS has no wheels (make gpu-wheels)" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m benchmarks.gpu_check "$@"

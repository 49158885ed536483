#!/usr/bin/env bash
# The README's first command: install the node into .venv and start it on the
# default config.yaml (embedded ONNX Runtime backend).
#
# The spleen demo weights are not part of the repository; when the workspace's
# shared model folder is present (../shared/models/spleen_ct_demo), they are
# imported into ./models once. A site installs its own models with
# `dicom-node models import` (see README, "Installing models").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
demo=../shared/models/spleen_ct_demo/1/model.onnx
if [ ! -f models/spleen_ct/1/model.onnx ] && [ -f "$demo" ]; then
  .venv/bin/dicom-node models import "$demo" --name spleen_ct --preset monai-spleen --repository models
fi
.venv/bin/dicom-node check-config config.yaml
exec .venv/bin/dicom-node serve --config config.yaml "$@"

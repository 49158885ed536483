"""The spleen model as the tests install it: the committed entry's config.pbtxt and pipeline.yaml
with the shared demo weights as version 1.

Only those two files are copied from `models/spleen_ct`: after `scripts/run.sh` the checkout's
entry also holds the weights (`1/model.onnx`), and the tests must pass in that checkout too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.peers import REPO, SHARED_MODELS

SPLEEN_ONNX = SHARED_MODELS / "spleen_ct_demo" / "1" / "model.onnx"


def install_spleen_model(repository: Path) -> Path:
    """Put the spleen_ct entry into the model repository folder `repository`; returns the entry."""
    entry = repository / "spleen_ct"
    (entry / "1").mkdir(parents=True, exist_ok=True)
    for name in ("config.pbtxt", "pipeline.yaml"):
        shutil.copyfile(REPO / "models" / "spleen_ct" / name, entry / name)
    shutil.copyfile(SPLEEN_ONNX, entry / "1" / "model.onnx")
    return entry

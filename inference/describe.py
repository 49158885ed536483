"""`python -m inference.describe MODEL.onnx`: the model's inputs and outputs as ONNX Runtime loads it, as JSON.

The embedded backend's readiness check runs this in a child process. The
process that answers `/readyz` and `dicom-node status` never infers, and an
ONNX Runtime session there would hold a second copy of every model beside the
job worker's (on a GPU, a second CUDA context too); a model file that crashes
ONNX Runtime's native code would take the node down with it. The child loads
on the CPU only: the tensors a model declares do not depend on the provider.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    (path,) = sys.argv[1:] if argv is None else argv
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own exception types
        print(str(error).strip().replace("\n", " "), file=sys.stderr)
        return 1

    def tensors(args) -> list[dict]:
        return [{"name": a.name, "type": a.type,
                 "shape": None if a.shape is None else [d if isinstance(d, int) else -1 for d in a.shape]}
                for a in args]

    json.dump({"inputs": tensors(session.get_inputs()), "outputs": tensors(session.get_outputs())}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

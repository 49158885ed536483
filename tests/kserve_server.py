"""A KServe v2 model server for the tests: every ONNX model of a Triton-layout repository, on ONNX Runtime.

Runs inside its own virtual environment (tests/peers/kserve.py builds it),
not the project's: it is an independent implementation of the Open Inference
(KServe v2) protocol that the node's triton backend must work against.

    python tests/kserve_server.py --repository DIR --http_port N --grpc_port M \
        --grpc_max_receive_message_length BYTES

Flags other than --repository are KServe's own ModelServer flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse

DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
             "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8"}


class OnnxModel(kserve.Model):
    """One model folder's latest version, run with ONNX Runtime on CPU."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def _types(self, args) -> list[dict]:
        return [{"name": a.name, "datatype": DATATYPES[a.type],
                 "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]

    def get_input_types(self) -> list[dict]:
        return self._types(self.session.get_inputs())

    def get_output_types(self) -> list[dict]:
        return self._types(self.session.get_outputs())

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        binary = payload.use_binary_outputs
        # gRPC: raw output contents (binary) whenever the inputs came raw; HTTP: per output, as the client asked.
        requested = {o.name: binary if payload.from_grpc else o.binary_data for o in payload.request_outputs or []}
        names = list(requested) or [o.name for o in self.session.get_outputs()]
        outputs = []
        for name, array in zip(names, self.session.run(names, feeds)):
            array = np.ascontiguousarray(array)
            output = InferOutput(name=name, shape=list(array.shape), datatype=DATATYPES[f"tensor({_onnx_type(array)})"])
            output.set_data_from_numpy(array, binary_data=bool(requested.get(name, binary)))
            outputs.append(output)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=binary, requested_outputs=payload.request_outputs or None)


def _onnx_type(array: np.ndarray) -> str:
    return {"float32": "float", "float16": "float16", "float64": "double", "int64": "int64",
            "int32": "int32", "uint8": "uint8"}[array.dtype.name]


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repository", type=Path, required=True)
    ours, _ = parser.parse_known_args()
    models = []
    for folder in sorted(p for p in ours.repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted((int(v.name) for v in folder.iterdir() if v.is_dir() and v.name.isdigit()))
        if versions and (folder / str(versions[-1]) / "model.onnx").is_file():
            models.append(OnnxModel(folder.name, folder / str(versions[-1]) / "model.onnx"))
    print(f"serving {[m.name for m in models]}", file=sys.stderr, flush=True)
    kserve.ModelServer().start(models)


if __name__ == "__main__":
    main()

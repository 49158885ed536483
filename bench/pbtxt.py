"""config.pbtxt reading time: protobuf's text format into Triton's ModelConfig vs a hand-written reader.

inference/repository.py reads config.pbtxt with protobuf's text format into
Triton's own ModelConfig message (tritonclient.grpc.model_config_pb2); until
then it had a small hand-written tokenizer, kept here (`handwritten`) only to
be measured against. The library is kept unless it is too slow for how often
a config is read: once per model each time the repository is listed or a
job's model is looked up, a few per job at most.

    .venv/bin/python bench/pbtxt.py [--repeat 2000]

Prints the date, the machine and microseconds per file for both readers on
the committed spleen_ct entry and on a larger config (instance groups,
dynamic batching, ten inputs).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import run_header  # noqa: E402
from inference.repository import parse_config_pbtxt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LARGE = "\n".join([
    'name: "large"', 'platform: "tensorrt_plan"', "max_batch_size: 8",
    *(f'input {{ name: "x{n}" data_type: TYPE_FP16 format: FORMAT_NONE dims: [ 1, 96, 96, 96 ] }}' for n in range(10)),
    'output [ { name: "z", data_type: TYPE_FP32, dims: [2, -1] } ]',
    "instance_group [ { count: 2 kind: KIND_GPU } ]",
    "dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 4, 8 ] }",
])

_TOKEN = re.compile(r'\s*(?:#[^\n]*|("(?:[^"\\]|\\.)*"|\'[^\']*\')|([{}\[\]:,;])|([^\s{}\[\]:,;#"\']+))')


def handwritten(path: Path) -> dict[str, list]:
    """The replaced reader: tokens, then nested dicts of lists, no schema."""
    tokens = [t for m in _TOKEN.finditer(path.read_text()) for t in (m.group(1) or m.group(2) or m.group(3),) if t]
    fields, _ = _message(tokens, 0, None)
    return fields


def _message(tokens: list[str], i: int, closing: str | None) -> tuple[dict[str, list], int]:
    fields: dict[str, list] = {}
    while i < len(tokens) and tokens[i] != closing:
        key = tokens[i]
        i += 1
        if tokens[i] == ":":
            i += 1
        value, i = _value(tokens, i)
        fields.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        if i < len(tokens) and tokens[i] in ",;":
            i += 1
    return fields, i


def _value(tokens: list[str], i: int) -> tuple[Any, int]:
    token = tokens[i]
    if token == "{":
        fields, i = _message(tokens, i + 1, "}")
        return fields, i + 1
    if token == "[":
        items, i = [], i + 1
        while tokens[i] != "]":
            item, i = _value(tokens, i)
            items.append(item)
            if tokens[i] == ",":
                i += 1
        return items, i + 1
    if token[0] in "\"'":
        return token[1:-1], i + 1
    return token, i + 1


def per_file_us(read, path: Path, repeat: int) -> float:
    read(path)  # warm: imports, caches
    start = time.perf_counter()
    for _ in range(repeat):
        read(path)
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    from google.protobuf.internal import api_implementation

    print(run_header(f"Python {platform.python_version()}, protobuf backend {api_implementation.Type()}"))
    with tempfile.TemporaryDirectory(prefix="bench-pbtxt-") as tmp:
        large = Path(tmp) / "config.pbtxt"
        large.write_text(LARGE)
        for label, path in (("spleen_ct (committed)", REPO / "models" / "spleen_ct" / "config.pbtxt"),
                            ("large (10 inputs)", large)):
            library, hand = per_file_us(parse_config_pbtxt, path, args.repeat), per_file_us(handwritten, path, args.repeat)
            print(f"  {label:22s} protobuf text_format + ModelConfig {library:8.1f} us/file   "
                  f"hand-written {hand:8.1f} us/file   ({library / hand:.2f}x)")


if __name__ == "__main__":
    main()

"""How the suite talks to the node: dcmtk storescu where it will send, a raw pynetdicom SCU where it will not.

storescu parses every file before sending and refuses broken ones locally,
so datasets that must reach the node broken (truncated, wrong lengths, bad
VRs) go through `raw_store`: pynetdicom's chunked file mode sends the bytes
after the file meta exactly as they are on disk, without decoding them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_context

from tests.peers import dcmtk

SUCCESS = 0x0000


@dataclass(frozen=True)
class Delivery:
    """What the node answered for one file: a DIMSE status, or why nothing was sent."""

    path: Path
    status: int | None  # C-STORE-RSP status; None when no C-STORE was answered
    detail: str

    @property
    def acknowledged(self) -> bool:
        return self.status == SUCCESS


def raw_store(port: int, files: Sequence[Path], *, calling_ae: str = "STORESCU", called_ae: str = "DICOMNODE",
              timeout: float = 60) -> list[Delivery]:
    """Send each file's dataset bytes as stored, proposing the SOP class and transfer syntax its meta names."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [split_dataset(path)[0] for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    ae.requested_contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in sorted(contexts)][:128]
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return [Delivery(path, None, "association not established") for path in files]
    deliveries = []
    try:
        for path in files:
            try:
                status = assoc.send_c_store(path)
            except (ValueError, AttributeError) as error:
                deliveries.append(Delivery(path, None, f"not sent: {error}"))
                continue
            code = int(status.Status) if status and "Status" in status else None
            deliveries.append(Delivery(path, code, "no response" if code is None else f"0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return deliveries


def storescu_store(port: int, files: Sequence[Path], *, calling_ae: str = "STORESCU") -> list[Delivery]:
    """dcmtk storescu, one association; each file's status from its verbose log."""
    result = dcmtk.storescu(port, files, calling_ae=calling_ae, extra=["--no-halt"])
    statuses: dict[Path, str] = {}
    sending = None
    for line in result.output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            sending = Path(m.group(1).strip())
        elif (m := re.search(r"Received Store Response \(([^)]*)\)", line)) and sending is not None:
            statuses[sending] = m.group(1)
            sending = None
    deliveries = []
    for path in files:
        text = statuses.get(Path(path))
        if text is None:
            deliveries.append(Delivery(path, None, "storescu sent no C-STORE for it"))
        else:
            deliveries.append(Delivery(path, SUCCESS if text == "Success" else _status_code(text), text))
    return deliveries


UNKNOWN_FAILURE = 0xFFFF


def _status_code(text: str) -> int:
    """storescu prints the status by name ("Refused: OutOfResources", "Error: CannotUnderstand")."""
    for name, code in (("OutOfResources", 0xA700), ("CannotUnderstand", 0xC000), ("Cannot understand", 0xC000),
                       ("DataSetDoesNotMatchSOPClass", 0xA900)):
        if name in text:
            return code
    return UNKNOWN_FAILURE

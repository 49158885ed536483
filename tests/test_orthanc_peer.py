"""dispatch.send to a real Orthanc: CT + SEG arrive byte-identical; outage; unknown calling AE refused."""
from __future__ import annotations

import io

import pydicom

from dicom_node.dispatch import registry as dispatch
from dicom_node.config.destinations import DestinationConfig
from tests.peers import SHARED_DATA, orthanc
from tests.series_factory import write_ct_series

pytestmark = orthanc.required()
SEG_SAMPLE = SHARED_DATA / "seg" / "highdicom" / "seg_image_ct_binary.dcm"


def destination(pacs: orthanc.Orthanc, **kw) -> DestinationConfig:
    return DestinationConfig(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port, timeout_s=30, **kw)  # a loaded machine


def test_ct_and_seg_arrive_identical_then_outage_is_transient(tmp_path):
    paths = write_ct_series(tmp_path / "src", 3) + [SEG_SAMPLE]
    pacs = orthanc.Orthanc(tmp_path / "orthanc")
    with pacs:
        report = dispatch.send(destination(pacs), paths, "NODE")
        assert [o.kind for o in report.outcomes] == ["sent"] * 4
        stored = {str(d.SOPInstanceUID): d for d in
                  (pydicom.dcmread(io.BytesIO(pacs.instance_file(i))) for i in pacs.instances())}
        for path in paths:
            source = pydicom.dcmread(path)
            assert stored[str(source.SOPInstanceUID)].PixelData == source.PixelData
        assert pacs.find_study(str(pydicom.dcmread(paths[0]).StudyInstanceUID))
    report = dispatch.send(destination(pacs), paths[:2], "NODE")
    assert [o.kind for o in report.outcomes] == ["transient", "transient"]
    with pacs:  # restarted with the same storage
        assert len(pacs.instances()) == 4


def test_unknown_calling_ae_is_permanent(tmp_path):
    paths = write_ct_series(tmp_path / "src", 1)
    with orthanc.Orthanc(tmp_path / "orthanc", allowed_aes={"NODE": 104}, restrict_calling_aes=True) as pacs:
        refused = dispatch.send(destination(pacs), paths, "STRANGER")
        accepted = dispatch.send(destination(pacs), paths, "NODE")
    assert refused.outcomes[0].kind == "permanent", refused.outcomes
    assert accepted.outcomes[0].kind == "sent"

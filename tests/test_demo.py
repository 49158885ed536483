"""`dicom-node demo-series`: a sendable CT series made from a folder of real slices, with new UIDs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from tests.peers import CT_J2K_SERIES, SHARED_DATA
from tests.series_factory import shared_slices

DICOM_NODE = Path(sys.executable).parent / "dicom-node"


def demo_series(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(DICOM_NODE), "demo-series", *argv], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_default_source_is_the_shared_ct_folder_beside_the_repository(tmp_path):
    """Run from a repository root whose ../shared/data/ct is the shared CT folder, as the README does."""
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "ct").symlink_to(CT_J2K_SERIES.parent)
    (tmp_path / "repo").mkdir()
    result = demo_series("out", "--slices", "25", cwd=tmp_path / "repo")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "25 CT instances (from 20 slices of ../shared/data/ct) in out\n"

    written = sorted((tmp_path / "repo" / "out").iterdir())
    datasets = [pydicom.dcmread(p) for p in written]
    assert [p.name for p in written] == [f"CT{n:05d}.dcm" for n in range(1, 26)]
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}) == 1
    source_uids = {str(pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID) for p in CT_J2K_SERIES.iterdir()}
    uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(uids) == 25 and not uids & source_uids
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {pydicom.uid.ExplicitVRLittleEndian}
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), 2.0)
    real = shared_slices()
    # slices 1..20 are the source's, foot to head; slice 21 walks back onto the last one
    assert all((datasets[n].pixel_array == real[n].pixels).all() for n in (0, 19))
    assert (datasets[20].pixel_array == real[19].pixels).all()


def test_a_source_with_two_series_or_none_is_refused(tmp_path):
    two = demo_series(str(tmp_path / "out"), "--source", str(SHARED_DATA), cwd=tmp_path)
    assert two.returncode == 1
    assert "CT slices of 2 series" in two.stderr and "give --source the folder of one" in two.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    none = demo_series(str(tmp_path / "out"), "--source", str(tmp_path / "empty"), cwd=tmp_path)
    assert none.returncode == 1
    assert none.stderr == (f"dicom-node demo-series: {tmp_path / 'empty'}: no CT Image Storage instance with "
                           "pixel data and a position\n")
    assert not (tmp_path / "out").exists()

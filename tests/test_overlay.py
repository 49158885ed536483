"""Overlay series: dciodvfy clean RGB Secondary Capture, outline exactly on the mask boundary."""

from __future__ import annotations

import typing
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.store.journal import StepOutcome
from dicom_node.results import OutputSeries
from dicom_node.results.overlay import PALETTE, OverlayOptions, write_overlay
from dicom_node.results.uids import UidSeed
from dicom_node.states import StepState
from inference.volume import Volume
from tests.peers import CT_J2K_SERIES, dciodvfy
from tests.test_seg import lung_map, real_sources

pytestmark = dciodvfy.required()


@lru_cache(maxsize=1)
def real_hu() -> Volume:
    """The shared CT in HU, as SimpleITK reads it (same grid as `real_sources`)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT_J2K_SERIES)))
    return Volume.from_sitk(reader.Execute())


def overlay_options(compress: bool = True) -> OverlayOptions:
    seed = UidSeed(str(real_sources()[0].SeriesInstanceUID), 1, "chest")
    return OverlayOptions(OutputSeries(seed, series_number=9903, series_description="AI lungs overlay"), compress=compress)


def contour(mask: np.ndarray) -> np.ndarray:
    """SimpleITK's own boundary of a 2-D mask (4-connected): an independent reference."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryContour(image, fullyConnected=False)) > 0


@pytest.mark.parametrize("compress", [True, False], ids=["rle", "explicit-le"])
def test_overlay_is_valid_and_outlines_the_mask(tmp_path: Path, compress: bool) -> None:
    sources, labels, hu = real_sources(), lung_map(), real_hu()
    assert hu.same_grid(labels.volume)
    paths = write_overlay(labels, sources, hu, tmp_path, overlay_options(compress))
    assert len(paths) == len(sources)

    series_uids = set()
    for k, path in enumerate(paths):
        if k in (0, 10):  # two slices through dciodvfy keep the test fast; all share one code path
            validation = dciodvfy.validate(path)
            assert validation.errors == [], validation.report()
        ds = pydicom.dcmread(path)
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.file_meta.TransferSyntaxUID == ("1.2.840.10008.1.2.5" if compress else "1.2.840.10008.1.2.1")
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BurnedInAnnotation) == ("RGB", 3, "YES")
        assert ds.StudyInstanceUID == sources[k].StudyInstanceUID
        assert ds.InstanceNumber == k + 1
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[k].SOPInstanceUID
        rgb = ds.pixel_array
        for value, colour in ((1, PALETTE[0]), (2, PALETTE[1])):
            painted = np.all(rgb == colour, axis=-1)
            np.testing.assert_array_equal(painted, contour(labels.volume.array[k] == value), err_msg=f"slice {k}")
        # Away from the outlines: the soft-tissue window, grey.
        grey = np.clip((hu.array[k].astype(np.float32) + 160) * (255 / 400), 0, 255).astype(np.uint8)
        plain = ~np.any([np.all(rgb == c, axis=-1) for c in PALETTE[:2]], axis=0)
        np.testing.assert_array_equal(rgb[plain][:, 0], grey[plain])
        assert (rgb[plain][:, 0] == rgb[plain][:, 2]).all()
    assert len(series_uids) == 1 and series_uids.isdisjoint({sources[0].SeriesInstanceUID})


@pytest.mark.parametrize("outputs,exported", [(["seg", "overlay"], ["seg"]), (["overlay"], ["overlay"]),
                                              (["seg", "sr", "overlay"], ["seg"])],
                         ids=["seg-and-overlay", "overlay-only", "sr-with-nothing-to-report"])
def test_the_overlay_is_exported_only_instead_of_a_seg(tmp_path: Path, outputs, exported) -> None:
    """The outputs registry writes every listed output; the overlay series goes out only where no SEG does,
    and otherwise stays in the job folder for a destination that refuses SEG's SOP class. A segmentation
    whose step completed has nothing to report beyond its SEG: no SR."""
    from dicom_node.config.pipelines import PipelineConfig
    from dicom_node.config.results import ResultsConfig
    from dicom_node.results.outputs import OUTPUTS, Produced, write_outputs
    assert set(typing.get_args(PipelineConfig.model_fields["outputs"].annotation.__args__[0])) == set(OUTPUTS)
    sources, labels, hu = real_sources(), lung_map(), real_hu()
    produced = Produced(ResultsConfig(), str(sources[0].SeriesInstanceUID), 1, "chest", 0, labels, [], [],
                        (StepOutcome("lungs", StepState.OK),), sources, [None] * len(sources), hu, tmp_path)
    paths = write_outputs(outputs, produced)
    kinds = {"1.2.840.10008.5.1.4.1.1.66.4": "seg", "1.2.840.10008.5.1.4.1.1.7": "overlay",
             "1.2.840.10008.5.1.4.1.1.88.33": "sr"}
    assert sorted({kinds[pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID] for p in paths}) == exported
    assert len(list((tmp_path / "overlay").glob("*.dcm"))) == len(sources)  # written either way

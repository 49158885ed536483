"""What the inference tests share: reading a series the way a reference reader does, and Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.volume import Volume


def read_series(folder: Path) -> Volume:
    """The series in `folder` as GDCM (SimpleITK's ImageSeriesReader) reads it: the loader's yardstick."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return Volume.from_sitk(reader.Execute())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(np.logical_and(a, b)) / (np.count_nonzero(a) + np.count_nonzero(b))

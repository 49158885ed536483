"""CT series made from the real shared series, for tests and benchmarks.

The shared data holds 20 real slices; larger series (300, 600 slices) are made
at test time by `dicom_node.ops.demo` (the `dicom-node demo-series` command's code):
the slices walked back and forth, so the anatomy stays continuous, every
instance with new UIDs and a new position.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.ops.demo import SeriesIds, Slice, ct_datasets as _demo_datasets, source_slices, walk, write_series
from tests.peers import CT_J2K_SERIES

__all__ = ["SeriesIds", "ct_datasets", "real_slices", "shared_slices", "walk", "write_ct_series"]


@lru_cache(maxsize=1)
def shared_slices() -> tuple[Slice, ...]:
    """The 20 shared slices, sorted foot-to-head by position, decoded once."""
    return source_slices(CT_J2K_SERIES)


def real_slices() -> tuple[tuple[Dataset, np.ndarray], ...]:
    """The shared slices as (data set without pixel data, pixels) pairs."""
    return tuple((s.dataset, s.pixels) for s in shared_slices())


def ct_datasets(n_slices: int, *, patient_id: str = "DN-TEST-0001", patient_name: str = "Test^Series",
                series_description: str = "CT Body synthetic", **kwargs) -> Iterator[Dataset]:
    """`dicom_node.ops.demo.ct_datasets` over the shared slices, with the tests' patient."""
    return _demo_datasets(shared_slices(), n_slices, patient_id=patient_id, patient_name=patient_name,
                          series_description=series_description, **kwargs)


def write_ct_series(out_dir: Path, n_slices: int, **kwargs) -> list[Path]:
    """Write `ct_datasets(...)` as Part 10 files named by instance number; returns the paths."""
    return write_series(out_dir, ct_datasets(n_slices, **kwargs))

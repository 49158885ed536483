"""The one image type shared by the node and the model side.

A `Volume` is what a CT series becomes once its geometry has been checked, and
what every segmentation result is expressed on. Axis conventions follow
SimpleITK (and through it DICOM's patient coordinate system, PS3.3 C.7.6.2.1.1)
so that a volume converts to and from a `SimpleITK.Image` without copying
semantics around:

- `array` is indexed `[k, j, i]` = `[slice, row, column]` (numpy C order, what
  `SimpleITK.GetArrayFromImage` returns);
- `spacing` is `(i, j, k)` in mm: column spacing, row spacing, slice spacing;
- `origin` is the LPS position in mm of the centre of voxel `[0, 0, 0]`;
- `direction` is a 3x3 matrix whose columns are the LPS unit vectors of the
  i, j and k axes (SimpleITK's row-major `GetDirection()` reshaped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True, eq=False)
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3-D [k, j, i], got shape {self.array.shape}")
        if np.shape(self.direction) != (3, 3):
            raise ValueError(f"Volume.direction must be 3x3, got shape {np.shape(self.direction)}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"Volume.spacing must be three positive values, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape `(k, j, i)`."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid carrying other voxel values (a mask, probabilities)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """LPS positions (mm) of voxel indices given as `(..., 3)` in `(i, j, k)` order."""
        scaled = np.asarray(ijk, dtype=np.float64) * np.asarray(self.spacing)
        return scaled @ np.asarray(self.direction, dtype=np.float64).T + np.asarray(self.origin)

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        """True when both volumes sample the same voxel centres."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in np.asarray(self.direction).ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing()),
            origin=tuple(image.GetOrigin()),
            direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        )

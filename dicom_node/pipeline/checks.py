"""The header checks a series passes before it becomes a volume: what `load_series` and routing refuse.

In: the headers of one series (`dicom_node.pipeline.frames`), no pixel. Out: the
slices in order (grouped by position), their spacing and in-plane offsets, and
the warnings (what is excluded), or a `SeriesGeometryError` naming the series and
the instances at fault: more than one series, no stack, colour pixels, two
Frames of Reference, unequal matrices, a missing slice, a sheared stack, more
voxels than allowed. Routing runs them before a job exists
(`volume.SeriesHeaders.check`), `volume.load_series` again before it decodes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from dicom_node import sop_classes
from dicom_node.pipeline.frames import Frame, SeriesGeometryError

# Image Orientation (Patient) values equal within this are one orientation (DS rounding is ~1e-6).
ORIENTATION_TOLERANCE = 1e-3
# Two frames whose positions along the normal differ by less than this are at the same position.
_SAME_POSITION_MM = 0.01
# A stack whose positions drift in-plane by more than this per mm along the normal is sheared (0.06 degrees).
_SHEAR_TOLERANCE = 1e-3
# Photometric Interpretations of grayscale pixels (PS3.3 C.7.6.3.1.2).
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# A slice normal within 15 degrees of a patient axis names the orientation (else "oblique").
AXIS_COSINE = math.cos(math.radians(15))


@dataclass(frozen=True)
class VolumeOptions:
    """How strict the loader is.

    `spacing_tolerance` is relative to the series' slice spacing (the median
    gap between slices, see `Check._spacing`): a gap further from it than
    this fraction is a missing (or extra) slice.
    `max_voxels` bounds the memory a header can make the loader allocate
    (65,535 x 65,535 is a valid Rows x Columns claim).
    `tilt`: a gantry-tilted (sheared) stack is refused by default, because a
    model trained on orthogonal grids sees a distorted patient otherwise;
    "resample" shifts each slice in-plane onto the orthogonal grid of the
    first slice (linear interpolation, edges padded with the volume minimum).
    """

    min_slices: int = 3
    spacing_tolerance: float = 0.05
    tilt: Literal["resample", "refuse"] = "refuse"
    max_voxels: int = 1 << 30  # 1024^3: a header claiming more is refused before anything is allocated


def position_text(frame: Frame) -> str:
    """A slice's position as an admin reads it: z for an axial slice, else the whole Image Position."""
    if abs(frame.normal[2]) >= AXIS_COSINE:
        return f"z={frame.position[2]:.6g} mm"
    return "(" + ", ".join(f"{v:.6g}" for v in frame.position) + ") mm"


class Check:
    """The geometry checks, in order; each raises with the series and the instances at fault."""

    def __init__(self, series_instance_uid: str, options: VolumeOptions):
        self.series = series_instance_uid
        self.options = options
        self.warnings: list[str] = []

    def fail(self, frames: Iterable[Frame], message: str) -> SeriesGeometryError:
        return SeriesGeometryError(self.series, list(dict.fromkeys(f.uid for f in frames)), message)

    def one_series(self, frames: Sequence[Frame]) -> None:
        uids = Counter(f.series_instance_uid for f in frames)
        if len(uids) > 1:
            main = uids.most_common(1)[0][0]
            raise self.fail([f for f in frames if f.series_instance_uid != main],
                            f"instances from {len(uids)} series given as one: {sorted(uids)}")

    def stack(self, frames: Sequence[Frame]) -> list[Frame]:
        """Exclude localizers, non-images and stray orientations when the rest is one stack.

        An image of the stack's own SOP Class without Image Position or
        Orientation (Patient) is a slice whose place is unknown: refused,
        because leaving it out would look like a missing slice. Another kind
        of image in the series (a Secondary Capture dose screen) is left out.
        """
        localizers = [f for f in frames if f.localizer]
        self._exclude(localizers, "Image Type LOCALIZER")
        rest = [f for f in frames if not f.localizer]
        self._exclude([f for f in rest if not f.is_image], "no pixel matrix: not an image")
        images = [f for f in rest if f.is_image]
        placed = [f for f in images if f.position is not None and f.orientation is not None]
        kinds = Counter(f.source.sop_class_uid for f in placed or images)
        kind = kinds.most_common(1)[0][0] if kinds else None
        unplaced = [f for f in images if f.position is None or f.orientation is None]
        broken = [f for f in unplaced if f.source.sop_class_uid == kind]
        if broken:
            first = broken[0]
            missing = " or ".join(name for name, value in (("Image Position (Patient)", first.position),
                                                           ("Image Orientation (Patient)", first.orientation))
                                  if value is None)
            if len(broken) == 1:
                raise self.fail(broken, f"{first.where} has no {missing}: its place in the volume is unknown")
            raise self.fail(broken, f"{first.where} and {len(broken) - 1} other frame(s) of the instances named "
                                    f"have no {missing}: their place in the volume is unknown")
        self._exclude(unplaced, "no Image Position/Orientation (Patient) and another SOP Class than the stack's")
        groups: list[list[Frame]] = []
        for frame in placed:
            group = next((g for g in groups if np.allclose(g[0].orientation, frame.orientation,
                                                           atol=ORIENTATION_TOLERANCE)), None)
            if group is None:
                groups.append([frame])
            else:
                group.append(frame)
        groups.sort(key=len, reverse=True)
        if not groups:
            raise self.fail(frames, "no image frames with a position and orientation")
        strays = [f for g in groups[1:] for f in g]
        if len(groups) > 1 and (len(groups[1]) == len(groups[0]) or len(groups[1]) >= self.options.min_slices):
            raise self.fail(strays, f"mixed orientations: {len(groups)} stacks with different Image Orientation "
                                    f"(Patient), sizes {[len(g) for g in groups]}")
        self._exclude(strays, "Image Orientation (Patient) differs from the rest of the stack")
        return groups[0]

    def image_classes(self, frames: Sequence[Frame]) -> None:
        """Only image storage SOP classes make a volume (sop_classes.is_image_class): pixels under an
        RT Structure Set's or a SEG's class are mislabelled, whatever they look like."""
        others = [f for f in frames if not sop_classes.is_image_class(f.source.sop_class_uid)]
        if others:
            names = sorted({sop_classes.name(f.source.sop_class_uid) for f in others})
            raise self.fail(others, f"{len(others)} of {len(frames)} frames are of {', '.join(names)}, not an "
                                    "image storage SOP class: no volume is made of them")

    def pixel_format(self, frames: Sequence[Frame]) -> None:
        """Grayscale, one sample per pixel: what a volume of Rescale Type units is made of.

        CT images are MONOCHROME1 or MONOCHROME2 (PS3.3 C.8.2.1.1.1); an RGB or
        YBR series is a screenshot or a mislabelled object, whose colour values
        a CT model would read as Hounsfield units.
        """
        for frame in frames:
            interpretation = frame.photometric_interpretation
            samples = frame.pixel_data.samples_per_pixel
            if interpretation in _GRAYSCALE and samples == 1:
                continue
            same = [f for f in frames
                    if (f.photometric_interpretation, f.pixel_data.samples_per_pixel) == (interpretation, samples)]
            raise self.fail(same, f"Photometric Interpretation {interpretation or '(absent)'} with {samples} "
                                  f"sample(s) per pixel in {len(same)} of {len(frames)} frames: the volume for a "
                                  "model needs MONOCHROME1 or MONOCHROME2 with 1 sample per pixel")

    def frame_of_reference(self, frames: Sequence[Frame]) -> None:
        """One Frame of Reference: positions in two are in unrelated coordinate systems (PS3.3 C.7.4.1)."""
        values = Counter(f.frame_of_reference_uid for f in frames)
        if len(values) > 1:
            main = values.most_common(1)[0][0]
            others = ", ".join(f"{uid or '(absent)'} in {count}" for uid, count in sorted(values.items())
                               if uid != main)
            raise self.fail([f for f in frames if f.frame_of_reference_uid != main],
                            f"mixed Frame of Reference UIDs: {main or '(absent)'} in {values[main]} frame(s), "
                            f"{others} (the instances named); positions in different frames of reference "
                            "cannot be stacked into one volume")

    def referenceable(self, frames: Sequence[Frame]) -> None:
        """Results reference either single-frame instances or the frames of one multi-frame instance
        (highdicom's Segmentation takes one multi-frame source, PS3.3 C.7.6.16.2.6)."""
        problem = next((f for f in frames if f.multiframe_problem), None)
        if problem is not None:
            raise self.fail([problem], problem.multiframe_problem)
        multiframe = list(dict.fromkeys(f.uid for f in frames if f.functional_groups))
        if multiframe and len(set(f.uid for f in frames)) > 1:
            single = len({f.uid for f in frames if not f.functional_groups})
            raise self.fail([f for f in frames if f.functional_groups][:1],
                            f"the stack spans {len(multiframe)} multi-frame and {single} single-frame instance(s): "
                            "a SEG references one multi-frame instance or single-frame instances only")

    def _exclude(self, frames: Sequence[Frame], why: str) -> None:
        if frames:
            uids = ", ".join(dict.fromkeys(f.uid for f in frames))
            self.warnings.append(f"excluded {len(frames)} frame(s) ({why}): {uids}")

    def same_matrix(self, frames: Sequence[Frame]) -> None:
        for name, key in (("Rows/Columns", lambda f: (f.rows, f.columns)),
                          ("Pixel Spacing", lambda f: f.pixel_spacing and tuple(round(v, 4) for v in f.pixel_spacing))):
            values = Counter(key(f) for f in frames)
            if len(values) > 1:
                main = values.most_common(1)[0][0]
                raise self.fail([f for f in frames if key(f) != main],
                                f"mixed {name}: {main} in most instances, {sorted(set(values) - {main}, key=str)} "
                                "in the ones named")
        if frames[0].pixel_spacing is None:
            raise self.fail(frames[:1], "no Pixel Spacing")

    def pixel_data(self, frames: Sequence[Frame], slices: int) -> None:
        """Before anything is allocated or decoded: a size the loader may allocate, pixels as the header says."""
        first = frames[0]
        voxels = slices * first.rows * first.columns
        if voxels > self.options.max_voxels:
            raise self.fail(frames[:1], f"{slices} x {first.rows} x {first.columns} = {voxels} voxels exceeds "
                                        f"the loader's limit of {self.options.max_voxels}")
        for frame in frames:
            native = not sop_classes.is_encapsulated(frame.transfer_syntax) if frame.transfer_syntax else True
            problem = frame.pixel_data.problem(frame.rows, frame.columns, native)
            if problem:
                raise self.fail([frame], problem)

    def positions(self, frames: Sequence[Frame]) -> tuple[list[list[Frame]], np.ndarray]:
        """Frames grouped by position along the normal, ascending; returns (groups, distances)."""
        normal = frames[0].normal
        ordered = sorted(frames, key=lambda f: (float(f.position @ normal), f.uid))
        groups: list[list[Frame]] = []
        for frame in ordered:
            if groups and abs(float((frame.position - groups[-1][0].position) @ normal)) < _SAME_POSITION_MM:
                groups[-1].append(frame)
            else:
                groups.append([frame])
        for group in groups:
            if any(np.linalg.norm(f.position - group[0].position) >= _SAME_POSITION_MM for f in group[1:]):
                raise self.fail(group, f"duplicate slice position {position_text(group[0])} along the normal but different "
                                       f"Image Position (Patient): {[list(f.position) for f in group]}")
        if len(groups) < self.options.min_slices:
            raise self.fail([], f"{len(groups)} distinct slice positions, fewer than the minimum "
                                f"{self.options.min_slices}")
        return groups, np.array([float(g[0].position @ normal) for g in groups])

    def uniform(self, groups: Sequence[Sequence[Frame]], distances: np.ndarray) -> float:
        """The slice spacing; a gap off the series' spacing (`_spacing`) by more than the tolerance is
        named for what it is: a missing slice (1.5 spacings or more), a duplicate position (half a
        spacing or less), or else non-uniform spacing."""
        gaps = np.diff(distances)
        series_spacing = self._spacing(gaps)
        for k, gap in enumerate(gaps):
            if abs(gap - series_spacing) <= self.options.spacing_tolerance * series_spacing:
                continue
            below, above = groups[k][0], groups[k + 1][0]
            spacing = f"{gap:.4g} mm apart where the series spacing is {series_spacing:.4g} mm"
            if gap >= 1.5 * series_spacing:
                missing = round(gap / series_spacing) - 1
                in_all = int(np.sum(np.maximum(np.round(gaps / series_spacing) - 1, 0)))
                raise self.fail([below, above], f"missing slice between {position_text(below)} and {position_text(above)}: {spacing} "
                                                f"(about {missing} slice(s) missing"
                                                + (f", {in_all} in the whole series)" if in_all > missing else ")"))
            if gap <= 0.5 * series_spacing:
                raise self.fail([below, above], f"duplicate slice position {position_text(below)}: instances {below.uid} "
                                                f"and {above.uid} are {spacing}")
            raise self.fail([below, above], f"non-uniform slice spacing between {position_text(below)} and {position_text(above)}: "
                                            f"{spacing}")
        return float(distances[-1] - distances[0]) / (len(distances) - 1)

    def _spacing(self, gaps: np.ndarray) -> float:
        """The median gap between slices; but the smallest gap when the median is a multiple of it, every
        gap is a whole number of it, and the slices that would be missing at that spacing are no more
        than those present. That is a series that arrived with slices missing here and there (a sender
        that released part of it): its spacing is what its adjacent slices show, and its longer gaps
        are missing slices, not its short ones duplicates. Positions that fit a fine grid only with most
        of it empty (a slice 0.4 mm from another in a 2 mm series) keep the median."""
        median = float(np.median(gaps))
        smallest = float(gaps.min())
        if median < 1.5 * smallest:
            return median
        steps = np.round(gaps / smallest)
        whole = bool(np.all(np.abs(gaps - steps * smallest) <= self.options.spacing_tolerance * smallest))
        return smallest if whole and np.sum(steps - 1) <= len(gaps) + 1 else median

    def shear(self, groups: Sequence[Sequence[Frame]]) -> np.ndarray:
        """In-plane offset (mm, LPS) of each slice from the first; non-zero for a gantry-tilted stack."""
        first = groups[0][0]
        normal = first.normal
        steps = np.array([g[0].position - first.position for g in groups])
        offsets = steps - np.outer(steps @ normal, normal)
        extent = float(steps[-1] @ normal)
        drift = float(np.max(np.linalg.norm(offsets, axis=1)))
        if drift <= _SHEAR_TOLERANCE * extent:
            return np.zeros_like(offsets)
        if self.options.tilt == "refuse":
            angle = math.degrees(math.atan2(float(np.linalg.norm(offsets[-1])), extent))
            raise self.fail([first, groups[-1][0]],
                            f"sheared stack (gantry tilt about {angle:.2f} degrees): positions drift "
                            f"{drift:.3g} mm in-plane over {extent:.4g} mm along the normal; "
                            "load with tilt='resample' to resample onto an orthogonal grid")
        self.warnings.append(f"gantry tilt: {drift:.3g} mm in-plane drift over {extent:.4g} mm resampled "
                             "onto the orthogonal grid of the first slice")
        return offsets



@dataclass(frozen=True, eq=False)
class Checked:
    """What the header checks found: the slices (frames grouped by position), where they are, their spacing."""

    check: Check
    stack: list[Frame]
    groups: list[list[Frame]]
    distances: np.ndarray
    spacing_k: float
    offsets: np.ndarray


def check_headers(ds: Dataset, frames: Sequence[Frame], options: VolumeOptions) -> Checked:
    """Every check that needs no decoded pixel, in order."""
    check = Check(str(ds.get("SeriesInstanceUID", "")), options)
    check.one_series(frames)
    stack = check.stack(frames)
    check.image_classes(stack)
    check.pixel_format(stack)
    check.frame_of_reference(stack)
    check.referenceable(stack)
    check.same_matrix(stack)
    groups, distances = check.positions(stack)
    spacing_k = check.uniform(groups, distances)
    offsets = check.shear(groups)
    check.pixel_data(stack, len(groups))
    return Checked(check, stack, groups, distances, spacing_k, offsets)

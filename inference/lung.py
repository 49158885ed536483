"""Classical lung segmentation: the chest pipeline's first step, with no weights.

Clara's lung model needs weights no one can publish, so the node ships this
threshold-and-topology recipe (after Hu, Hoffman and Reinhardt, IEEE TMI 2001)
so a chest pipeline works out of the box:

1. body: voxels above -500 HU, the largest 3-D component (drops the table and
   the arms when they are apart), holes filled slice by slice so the lungs
   become part of it;
2. air inside the body: below -320 HU; components touching the in-plane border
   of the field of view are outside air;
3. trachea and main bronchi: a small round air region near the midline in the
   top slices, followed slice by slice downwards until each branch merges into
   a lung's cross-section;
4. lungs: what is left, kept only when a component looks like a lung (size in
   mL, parenchyma mean HU, extends to the posterior half of the body) so bowel
   gas on an abdominal CT is never labelled; the size limit is small (20 mL by
   default) so partial lungs count: the bases an abdominal CT catches, the
   apices of a neck CT;
5. right/left: label 1 right lung, label 2 left lung, by position in LPS
   (PS3.3 C.7.6.2.1.1: +x is the patient's left) of each lung's centre
   relative to the body's midline, never by component order, so one lung alone
   in the field of view keeps its side; lungs that touch are split where an
   in-plane erosion separates them, else at the body midline;
6. smoothing: an optional closing (`closing_mm`), then holes of each lung
   (vessels) filled slice by slice.

Every threshold is a step option (`inference.parameters.LungParameters`).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from inference import transforms
from inference.parameters import LungParameters
from inference.results import Algorithm, Code, LabelMap, SegmentLabel
from inference.volume import Volume

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
RIGHT_LUNG = SegmentLabel(1, "Right lung", ANATOMICAL_STRUCTURE, Code("3341006", "SCT", "Right lung"))
LEFT_LUNG = SegmentLabel(2, "Left lung", ANATOMICAL_STRUCTURE, Code("44029006", "SCT", "Left lung"))
ALGORITHM = Algorithm(
    name="dicom-node classical lung segmentation",
    version="1",
    family=Code("123104", "DCM", "Morphological Operations"),  # PS3.16 CID 7162
    source="threshold, body mask, airway tracking, left/right split",
)


def segment_lungs_classical(volume: Volume, parameters: LungParameters = LungParameters()) -> LabelMap:
    """Label the right (1) and left (2) lung of a CT volume in HU; empty when no lung is found."""
    hu = np.asarray(volume.array, dtype=np.float32)
    body = _largest_component(hu > parameters.body_hu)
    body = fill_holes_slicewise(body)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if body.any():
        air = _drop_border_components(body & (hu < parameters.air_hu))
        airways = _airways(air, volume, body, parameters) if parameters.exclude_airways else np.zeros_like(air)
        lungs = _lung_components(air & ~airways, hu, volume, body, parameters)
        labels = _right_left(lungs, volume, body, parameters)
        for value in (RIGHT_LUNG.value, LEFT_LUNG.value):
            _smooth(labels, value, volume, parameters, airways)
    return LabelMap(volume.with_array(labels), (RIGHT_LUNG, LEFT_LUNG), ALGORITHM)


def _smooth(labels: np.ndarray, value: int, volume: Volume, p: LungParameters, airways: np.ndarray) -> None:
    """Close one lung (`closing_mm`) and fill its slice holes (vessels), in place, never over the other
    lung or the tracked airways."""
    box = transforms.bounding_box(labels == value, margin=_radius_voxels(p.closing_mm, volume).max())
    if box is None:
        return
    region = labels[box]  # a view
    mask = region == value
    if p.closing_mm > 0:
        image = sitk.BinaryMorphologicalClosing(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                _radius_voxels(p.closing_mm, volume).tolist(), sitk.sitkBall)
        mask = sitk.GetArrayFromImage(image).astype(bool)
    if p.fill_vessels:
        mask = fill_holes_slicewise(mask)
    region[mask & (region == 0) & ~airways[box]] = value


def _radius_voxels(radius_mm: float, volume: Volume) -> np.ndarray:
    """A radius in mm as whole voxels along (i, j, k), at least 1 along each axis when not 0."""
    if radius_mm <= 0:
        return np.zeros(3, dtype=int)
    return np.maximum(1, np.round(radius_mm / np.asarray(volume.spacing))).astype(int)


def fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of each axial slice (2-D, 4-connected background) in one SimpleITK call.

    The slices are laid side by side in one 2-D image with a background column
    between them, so background touching a slice's edge reaches the image
    border and every slice is filled on its own.
    """
    k, j, i = mask.shape
    tiled = np.zeros((j + 2, k * (i + 1) + 1), dtype=np.uint8)
    tiles = tiled[1:-1, 1:].reshape(j, k, i + 1)
    tiles[:, :, :i] = mask.transpose(1, 0, 2)
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(tiled), False, 1))
    return filled[1:-1, 1:].reshape(j, k, i + 1)[:, :, :i].transpose(1, 0, 2).astype(bool)


def _components(mask: np.ndarray) -> np.ndarray:
    """Face-connected 3-D components, labelled by decreasing size."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(image, False)))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    return _components(mask) == 1 if mask.any() else mask


def _drop_border_components(mask: np.ndarray) -> np.ndarray:
    """Remove components touching the in-plane edges of the field of view (outside air)."""
    labels = _components(mask)
    edge = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                           labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    return mask & ~np.isin(labels, np.unique(edge[edge > 0]))


def _slice_order(volume: Volume) -> np.ndarray:
    """Slice indices from head to feet (LPS +z is superior)."""
    order = np.arange(volume.shape[0])
    return order[::-1] if np.asarray(volume.direction)[2, 2] > 0 else order



def _centroid_lps(mask: np.ndarray, volume: Volume) -> np.ndarray:
    """LPS centre of mass of a 3-D mask, from its marginal sums (no index list of every voxel)."""
    total = float(np.count_nonzero(mask))
    kji = [
        float(np.arange(n) @ mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)) / total
        for axis, n in enumerate(mask.shape)
    ]
    return volume.index_to_lps(np.array(kji[::-1]))


def _airways(air: np.ndarray, volume: Volume, body: np.ndarray, p: LungParameters) -> np.ndarray:
    """Trachea and main bronchi: small air regions followed from the top slices down.

    The trachea is found in the most superior slices as a small region near the
    body's left-right middle; each later slice keeps the regions that overlap
    the previous slice's airway and stay small. When a bronchus enters the
    lung its cross-section joins the lung's and grows past the limit, which
    ends that branch.
    """
    airway = np.zeros(air.shape, dtype=bool)
    pixel_mm2 = volume.spacing[0] * volume.spacing[1]
    max_pixels = p.max_airway_area_mm2 / pixel_mm2
    midline_x = _centroid_lps(body, volume)[0]
    previous: np.ndarray | None = None
    searched_mm = 0.0
    for k in _slice_order(volume):
        if not air[k].any():
            if previous is not None:
                break
            continue
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(air[k].astype(np.uint8)), False))
        counts = np.bincount(labels.ravel())
        if previous is None:
            x = _region_x(labels, counts, volume, k)
            keep = [value for value in range(1, len(counts))
                    if counts[value] <= max_pixels and abs(x[value] - midline_x) <= p.airway_search_mm]
            searched_mm += volume.spacing[2]
            if not keep:
                if searched_mm > 3 * p.airway_search_mm:
                    break
                continue
        else:
            keep = [value for value in np.unique(labels[previous]) if value and counts[value] <= max_pixels]
            if not keep:
                break
        previous = np.isin(labels, keep)
        airway[k] = previous
    return airway


def _region_x(labels: np.ndarray, counts: np.ndarray, volume: Volume, k: int) -> np.ndarray:
    """LPS x (mm) of the centre of every labelled region of slice k."""
    rows, columns = np.indices(labels.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        i = np.bincount(labels.ravel(), weights=columns.ravel(), minlength=len(counts)) / counts
        j = np.bincount(labels.ravel(), weights=rows.ravel(), minlength=len(counts)) / counts
    ijk = np.stack([i, j, np.full(len(counts), float(k))], axis=-1)
    return volume.index_to_lps(ijk)[:, 0]


def _lung_components(air: np.ndarray, hu: np.ndarray, volume: Volume, body: np.ndarray,
                     p: LungParameters) -> list[np.ndarray]:
    """The (at most two) air components that look like lungs, largest first.

    A lung holds at least `min_lung_ml`, its mean is that of parenchyma
    (-850 HU or so; partial volume with vessels keeps it above pure air) and it
    reaches the posterior half of the body (lungs line the posterior ribs of a
    supine patient, while bowel gas rises anteriorly).
    """
    labels = _components(air)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    counts = np.bincount(labels.ravel())
    body_y = _centroid_lps(body, volume)[1]
    lungs = []
    for value in range(1, len(counts)):
        if counts[value] * voxel_ml < p.min_lung_ml or len(lungs) == 2:
            break
        mask = labels == value
        box = transforms.bounding_box(mask)
        mean = float(hu[box][mask[box]].mean())
        if not p.parenchyma_hu[0] <= mean <= p.parenchyma_hu[1]:
            continue
        corners = np.array([[s.start, s.stop - 1] for s in box[::-1]])  # (i, j, k) x (first, last)
        posterior_y = max(volume.index_to_lps(np.array([a, b, c]))[1]
                          for a in corners[0] for b in corners[1] for c in corners[2])
        if posterior_y < body_y:
            continue
        lungs.append(mask)
    return lungs


def _right_left(lungs: list[np.ndarray], volume: Volume, body: np.ndarray, p: LungParameters) -> np.ndarray:
    """Label 1 for the patient's right lung (-x in LPS), 2 for the left."""
    labels = np.zeros(body.shape, dtype=np.uint8)
    midline_x = _centroid_lps(body, volume)[0]
    parts: list[np.ndarray] = []
    for mask in lungs:
        parts.extend(_split_touching(mask, volume, midline_x, p) if len(lungs) == 1 else [mask])
    for mask in parts:
        x = _centroid_lps(mask, volume)[0]
        labels[mask] = LEFT_LUNG.value if x > midline_x else RIGHT_LUNG.value
    return labels


def _split_touching(mask: np.ndarray, volume: Volume, midline_x: float, p: LungParameters) -> list[np.ndarray]:
    """One component holding both lungs (they touch at the anterior junction) as two.

    The component is eroded in-plane until it falls apart into two large
    pieces; each voxel then goes to the nearer piece. A single lung (the other
    one missing) or lungs that never separate are cut at the body midline.
    """
    x = volume.index_to_lps(np.argwhere(mask)[:, ::-1])[:, 0]
    if min((x < midline_x).mean(), (x > midline_x).mean()) < 0.2:
        return [mask]
    kji = np.argwhere(mask)
    low, high = kji.min(axis=0), kji.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(low, high))
    image = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    eroded = image
    for _ in range(p.max_split_erosions):
        eroded = sitk.BinaryErode(eroded, (1, 1, 0), sitk.sitkBall, 0, 1)
        pieces = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(eroded, False)))
        sizes = np.bincount(pieces.ravel())[1:]
        if len(sizes) >= 2 and sizes[1] >= 0.2 * sizes[0]:
            distances = [_distance_mm(pieces == value, volume.spacing) for value in (1, 2)]
            nearer_first = distances[0] <= distances[1]
            split = [np.zeros(mask.shape, bool), np.zeros(mask.shape, bool)]
            split[0][box] = mask[box] & nearer_first
            split[1][box] = mask[box] & ~nearer_first
            return split
    lps_x = np.zeros(mask.shape, dtype=bool)
    lps_x[tuple(kji.T)] = x > midline_x
    return [mask & ~lps_x, mask & lps_x]


def _distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, False, False, True))

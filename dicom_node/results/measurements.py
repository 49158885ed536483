"""Lung involvement's part of the job's TID 1500 Measurement Report (`sr.write_report`).

Measurement groups (PS3.16 TID 1500 row 6, Imaging Measurements):

- one Volumetric ROI group (TID 1411) per lung and per zone, each referencing
  its lung's segment of the job's SEG (ReferencedSegment: SEG SOP Instance,
  Segment Number, source series), finding type the lung, finding site the
  zone (SCT upper/middle/lower zone of lung, with laterality); measurements:
  Volume (SCT 118565006, mL), mean attenuation (DCM 112031, derivation Mean,
  HU), per HU band its volume (mL) and percentage, percentage of opacity and
  of high opacity, and per zone its severity score (0-4);
- one group (TID 1501) for both lungs: the total score and the Severity
  (SCT 246112005) category as a qualitative evaluation, none/mild/moderate/
  severe in SNOMED CT.

Its Comment for the report's Qualitative Evaluations container is the
disclaimer (quantification, not a diagnosis), or, with no lung in the series,
that the involvement was not assessed.

Concepts with no standard code (the HU bands, opacity percentages, the
severity score) get local codes in the private scheme 99DCMNODE (PS3.16 8.2).
"""

from __future__ import annotations

from collections.abc import Iterator

import highdicom as hd
import pydicom

from dicom_node.results import LOCAL_SCHEME
from dicom_node.results.seg import coded
from inference.involvement import LungInvolvement, RegionInvolvement
from inference.lung import RIGHT_LUNG
from inference.results import Code

CT_OF_CHEST = Code("169069000", "SCT", "Computed tomography of chest")
VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
LUNG = Code("39607008", "SCT", "Lung")
SEVERITY = Code("246112005", "SCT", "Severity")
CATEGORY_CODES = {"none": Code("260413007", "SCT", "None"), "mild": Code("255604002", "SCT", "Mild"),
                  "moderate": Code("6736007", "SCT", "Moderate"), "severe": Code("24484000", "SCT", "Severe")}
ZONE_CODES = {"upper": Code("281392002", "SCT", "Upper zone of lung"),
              "middle": Code("281393007", "SCT", "Middle zone of lung"),
              "lower": Code("281394001", "SCT", "Lower zone of lung")}
LATERALITY = {True: Code("24028007", "SCT", "Right"), False: Code("7771000", "SCT", "Left")}
# band -> (short local code, words); Code Value is at most 16 characters (PS3.3 8.1: SH).
BAND_NAMES = {"emphysema": ("emph", "emphysema"), "normal": ("norm", "normally aerated"),
              "ground_glass": ("ggo", "ground-glass"), "consolidation": ("consol", "consolidation")}
OPACITY = Code("opacity-pct", LOCAL_SCHEME, "Percentage of opacity")
HIGH_OPACITY = Code("hi-opacity-pct", LOCAL_SCHEME, "Percentage of high opacity")
ZONE_SCORE = Code("zone-score", LOCAL_SCHEME, "Lung zone severity score")
TOTAL_SCORE = Code("total-score", LOCAL_SCHEME, "Lung severity score, 6 zones")
MILLILITRE = Code("mL", "UCUM", "milliliter")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = Code("%", "UCUM", "Percent")
UNITLESS = Code("1", "UCUM", "no units")


def band_codes(band: str) -> tuple[Code, Code]:
    """Local codes of a band's volume and percentage."""
    code, name = BAND_NAMES[band]
    return (Code(f"{code}-vol", LOCAL_SCHEME, f"Volume of lung in {name} band"),
            Code(f"{code}-pct", LOCAL_SCHEME, f"Percentage of lung in {name} band"))


def involvement_groups(result: LungInvolvement, seg: pydicom.Dataset | None, source_series_uid: str,
                       tracking_uids: Iterator[str]) -> list:
    """The groups of one lung involvement step (see the module docstring); none when no lung was found.

    `seg`: the header of the job's SEG, whose lung segments (found by their Segmented Property Type) the
    volumetric groups reference; without one (outputs without `seg`, or an empty lung mask skipped) the
    groups stand alone. `tracking_uids`: the report's Tracking Unique Identifiers, one taken per group.
    """
    if not result.lungs:
        return []
    algorithm = hd.sr.AlgorithmIdentification(name=result.opacities.algorithm.name[:64],
                                              version=result.opacities.algorithm.version[:64],
                                              family=coded(result.opacities.algorithm.family))
    numbers = {str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue): int(item.SegmentNumber)
               for item in (seg.SegmentSequence if seg is not None else [])}
    groups: list = []
    for region in (*result.lungs, *result.zones):
        segment = None
        if region.lung.type.value in numbers:
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=numbers[region.lung.type.value],
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid))
        right = region.lung.value == RIGHT_LUNG.value
        site = hd.sr.FindingSite(anatomic_location=coded(ZONE_CODES[region.zone] if region.zone else region.lung.type),
                                 laterality=coded(LATERALITY[right]) if region.zone else None)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=next(tracking_uids), identifier=region.name),
            referenced_segment=segment, finding_type=coded(region.lung.type), finding_sites=[site],
            algorithm_id=algorithm, measurements=_measurements(region, algorithm)))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=next(tracking_uids), identifier="both lungs"),
        finding_type=coded(LUNG), algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=coded(TOTAL_SCORE), value=float(result.total_score),
                                        unit=coded(UNITLESS), algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(SEVERITY),
                                                             value=coded(CATEGORY_CODES[result.category]))]))
    return groups


def involvement_comment(result: LungInvolvement) -> str:
    """The report's Comment on one lung involvement step: its disclaimer, or that no lung was there to assess."""
    if result.lungs:
        return result.disclaimer
    return "Lung involvement: not assessed, no lung found in the series"


def _measurements(region: RegionInvolvement, algorithm) -> list[hd.sr.Measurement]:
    def measurement(name: Code, value: float, unit: Code, derivation: Code | None = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=coded(name), value=round(float(value), 3), unit=coded(unit),
                                 derivation=coded(derivation) if derivation else None, algorithm_id=algorithm)

    items = [measurement(VOLUME, region.volume_ml, MILLILITRE)]
    if region.mean_hu is not None:
        items.append(measurement(ATTENUATION, region.mean_hu, HU, MEAN))
    for band in region.bands:
        volume_code, percent_code = band_codes(band.band)
        items += [measurement(volume_code, band.volume_ml, MILLILITRE), measurement(percent_code, band.percent, PERCENT)]
    items += [measurement(OPACITY, region.opacity_percent, PERCENT),
              measurement(HIGH_OPACITY, region.high_opacity_percent, PERCENT)]
    if region.score is not None:
        items.append(measurement(ZONE_SCORE, region.score, UNITLESS))
    return items

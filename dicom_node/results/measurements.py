"""Lung involvement as a TID 1500 Measurement Report (Comprehensive 3D SR), plus a JSON copy.

Content tree (PS3.16 TID 1500):

- one Volumetric ROI group (TID 1411) per lung and per zone, each referencing
  its lung's segment of the job's SEG (ReferencedSegment: SEG SOP Instance,
  Segment Number, source series), finding type the lung, finding site the
  zone (SCT upper/middle/lower zone of lung, with laterality); measurements:
  Volume (SCT 118565006, mL), mean attenuation (DCM 112031, derivation Mean,
  HU), per HU band its volume (mL) and percentage, percentage of opacity and
  of high opacity, and per zone its severity score (0-4);
- one group (TID 1501) for both lungs: the total score and the Severity
  (SCT 246112005) category as a qualitative evaluation, none/mild/moderate/
  severe in SNOMED CT;
- the TID 1500 Qualitative Evaluations container (C0034375, UMLS) holding the
  disclaimer as TEXT: quantification, not a diagnosis.

Concepts with no standard code (the HU bands, opacity percentages, the
severity score) get local codes in the private scheme 99DCMNODE (PS3.16 8.2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.results import save_dataset, source_headers, write_atomically
from dicom_node.results.seg import coded
from dicom_node.results.sr import LOCAL_SCHEME, SrOptions, observation_context
from inference.involvement import LungInvolvement, RegionInvolvement
from inference.lung import RIGHT_LUNG
from inference.results import Code

SR_KIND = "involvement-sr"
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
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
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


def write_involvement_sr(result: LungInvolvement, sources: Sequence[pydicom.Dataset], seg_paths: Sequence[Path],
                         out_dir: Path, options: SrOptions) -> Path:
    """Write the SR and `<same name>.json` in `out_dir`; returns the SR's path.

    `seg_paths`: the job's SEG, whose lung segments (found by their
    Segmented Property Type) the volumetric groups reference; without one
    (outputs without `seg`, or an empty lung mask skipped) the groups stand alone.
    """
    headers = source_headers(sources)
    series, seed = options.series, options.series.seed
    algorithm = hd.sr.AlgorithmIdentification(name=result.opacities.algorithm.name[:64],
                                              version=result.opacities.algorithm.version[:64],
                                              family=coded(result.opacities.algorithm.family))
    seg = pydicom.dcmread(seg_paths[0], stop_before_pixels=True) if seg_paths else None
    numbers = {str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue): int(item.SegmentNumber)
               for item in (seg.SegmentSequence if seg is not None else [])}
    groups: list = []
    for index, region in enumerate((*result.lungs, *result.zones)):
        segment = None
        if region.lung.type.value in numbers:
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=numbers[region.lung.type.value],
                source_series=hd.sr.SourceSeriesForSegmentation(str(headers[0].SeriesInstanceUID)))
        right = region.lung.value == RIGHT_LUNG.value
        site = hd.sr.FindingSite(anatomic_location=coded(ZONE_CODES[region.zone] if region.zone else region.lung.type),
                                 laterality=coded(LATERALITY[right]) if region.zone else None)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=seed.instance_uid(f"{SR_KIND}-tracking", index),
                                                         identifier=region.name),
            referenced_segment=segment, finding_type=coded(region.lung.type), finding_sites=[site],
            algorithm_id=algorithm, measurements=_measurements(region, algorithm)))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=seed.instance_uid(f"{SR_KIND}-tracking", len(groups)),
                                                     identifier="both lungs"),
        finding_type=coded(LUNG), algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=coded(TOTAL_SCORE), value=float(result.total_score),
                                        unit=coded(UNITLESS), algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(SEVERITY),
                                                             value=coded(CATEGORY_CODES[result.category]))]))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(series, SR_KIND), procedure_reported=coded(CT_OF_CHEST),
        imaging_measurements=groups, referenced_images=headers)
    evaluations = hd.sr.ContainerContentItem(name=coded(QUALITATIVE_EVALUATIONS),
                                             relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = [hd.sr.TextContentItem(name=codes.DCM.Comment, value=result.disclaimer,
                                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    report[0].ContentSequence.append(evaluations)
    document = hd.sr.Comprehensive3DSR(
        evidence=[*headers, *([seg] if seg is not None else [])], content=report,
        series_instance_uid=seed.series_uid(SR_KIND),
        series_number=series.series_number, sop_instance_uid=seed.instance_uid(SR_KIND), instance_number=1,
        manufacturer=series.manufacturer, is_complete=True,
        series_description=f"{series.series_description} lung involvement"[:64])
    document.ManufacturerModelName = series.manufacturer_model_name[:64]
    document.SoftwareVersions = series.software_versions[:64]
    document.DeviceSerialNumber = series.device_serial_number[:64]
    path = save_dataset(document, out_dir / f"SR_{document.SOPInstanceUID}.dcm")
    summary = {"sop_instance_uid": str(document.SOPInstanceUID),
               "series_instance_uid": str(document.SeriesInstanceUID),
               "referenced_seg_sop_instance_uid": str(seg.SOPInstanceUID) if seg is not None else None,
               **result.as_json()}
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(path.with_name("involvement.json"), lambda handle: handle.write(text.encode()))
    return path


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

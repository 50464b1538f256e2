"""A scored image's result as a DICOM Comprehensive SR (highdicom), and the same SR read back as values.

One SR per scored image (per frame for multi-frame), in the source image's study, so the viewer
shows it next to the image: the finding (the predicted class), each class's probability, the
decision threshold, the model id and version, the run, the row's status and, when the model
declined the image, the out-of-scope reason, plus an IMAGE item referencing the source instance
(SOP class + instance UID, frame). Patient and study attributes are copied from the source's
metadata by highdicom, as the SR IOD requires; they exist only in the SR sent to the PACS,
never in the predictions or the logs.

Codes: DCM where the standard has one (Finding, Comment, Source); medclf's own items use the
private coding scheme 99MEDCLF (DICOM reserves "99" prefixes for local schemes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SCHEME = "99MEDCLF"
SERIES_NUMBER = 9901  # a high number: viewers list the AI results after the acquisition series
SERIES_DESCRIPTION = "medclf AI result - not for diagnosis"
DISCLAIMER = ("Automated classification by medclf, a decision-support model: not a diagnosis; "
              "to be read by a radiologist together with the image.")

# concept code value -> (meaning); the SR's item names, used to build it and to read it back
ITEMS = {
    "FINDING": ("121071", "DCM", "Finding"),
    "COMMENT": ("121106", "DCM", "Comment"),
    "SOURCE": ("260753009", "SCT", "Source"),
    "THRESHOLD": ("MCTHR", SCHEME, "Decision threshold"),
    "MODEL_ID": ("MCMID", SCHEME, "Model id"),
    "MODEL_VERSION": ("MCMVER", SCHEME, "Model version"),
    "RUN_ID": ("MCRUN", SCHEME, "Scoring run"),
    "ADAPTATION_ID": ("MCADAPT", SCHEME, "Site profile (label-free adaptation)"),
    "CALIBRATION_ID": ("MCCAL", SCHEME, "Site calibration"),
    "STATUS": ("MCSTAT", SCHEME, "Result status"),
    "REASON": ("MCOOS", SCHEME, "Out-of-scope reason"),
}
PROBABILITY_CODE = "MCPROB"  # one NUM per class: "Probability of <class>"


@dataclass
class Result:
    """What the SR says about one image (one predictions row)."""

    status: str  # ok | out_of_scope
    probabilities: dict  # class -> probability (empty when the image was not scored)
    finding: Optional[str]  # the predicted class; None out of scope
    threshold: Optional[float]
    model_id: str
    model_version: str
    run_id: str
    reason: Optional[str] = None  # out of scope: why
    frame: Optional[int] = None  # 0-based, None for a single-frame image
    adaptation_id: Optional[str] = None  # the site profile scoring used (medclf.model.adapt); None: none
    calibration_id: Optional[str] = None  # the site calibration file (medclf.model.site_calibration); None: none


def sr_uid(source_sop: str, frame: Optional[int], model_id: str, run_id: str) -> str:
    """Deterministic: sending the same run's SR twice stores one instance (the PACS keeps the first)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medclf-sr", source_sop, str(frame), model_id, run_id])


def build_sr(source, result: Result, instance_number: int = 1):
    """The SR for `result`; `source`: the source image's dataset (its metadata is enough, no pixels)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    def concept(key):
        return hd.sr.CodedConcept(*ITEMS[key])

    source = _with_type2(source)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    items = [hd.sr.TextContentItem(concept("COMMENT"), DISCLAIMER, relationship_type=contains),
             hd.sr.TextContentItem(concept("STATUS"), result.status, relationship_type=contains)]
    if result.finding is not None:
        items.append(hd.sr.CodeContentItem(concept("FINDING"), hd.sr.CodedConcept(result.finding, SCHEME,
                                                                                  result.finding),
                                           relationship_type=contains))
    for cls, p in result.probabilities.items():
        items.append(hd.sr.NumContentItem(hd.sr.CodedConcept(f"{PROBABILITY_CODE}-{cls}"[:16], SCHEME,
                                                             f"Probability of {cls}"),
                                          float(p), unit, relationship_type=contains))
    if result.threshold is not None:
        items.append(hd.sr.NumContentItem(concept("THRESHOLD"), float(result.threshold), unit,
                                          relationship_type=contains))
    if result.reason:
        items.append(hd.sr.TextContentItem(concept("REASON"), result.reason, relationship_type=contains))
    for key, value in (("MODEL_ID", result.model_id), ("MODEL_VERSION", result.model_version),
                       ("RUN_ID", result.run_id), ("ADAPTATION_ID", result.adaptation_id),
                       ("CALIBRATION_ID", result.calibration_id)):
        if value is not None:  # absent: the model's own statistics / calibration
            items.append(hd.sr.TextContentItem(concept(key), value, relationship_type=contains))
    items.append(hd.sr.ImageContentItem(concept("SOURCE"), source.SOPClassUID, source.SOPInstanceUID,
                                        referenced_frame_numbers=None if result.frame is None else result.frame + 1,
                                        relationship_type=contains))
    root = hd.sr.ContainerContentItem(hd.sr.CodedConcept("MCRESULT", SCHEME, "medclf AI classification result"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=root,
        series_instance_uid=generate_uid(entropy_srcs=["medclf-sr-series", source.StudyInstanceUID,
                                                       result.model_id, result.run_id]),
        series_number=SERIES_NUMBER, sop_instance_uid=sr_uid(source.SOPInstanceUID, result.frame, result.model_id,
                                                             result.run_id),
        instance_number=instance_number, manufacturer="medclf", series_description=SERIES_DESCRIPTION,
        is_complete=True, is_final=False, is_verified=False)


# Type 2 patient/study attributes the SR must carry (empty when unknown); highdicom copies them from
# the evidence and needs them present. A source missing one gets it empty, as the standard allows.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(source):
    from pydicom.dataset import Dataset

    out = Dataset()
    out.update(source)  # a shallow copy; the caller's dataset is left as it was
    for keyword in TYPE2:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def read_sr(ds) -> dict:
    """An SR made by `build_sr` as plain values: the inverse, for tests and for rendering as text."""
    meaning = {code: key for key, (code, _, _) in ITEMS.items()}
    out: dict = {"probabilities": {}, "source": None, "frame": None}
    for item in ds.ContentSequence:
        code = item.ConceptNameCodeSequence[0].CodeValue
        kind = item.ValueType
        if kind == "NUM" and code.startswith(PROBABILITY_CODE):
            cls = item.ConceptNameCodeSequence[0].CodeMeaning.removeprefix("Probability of ")
            out["probabilities"][cls] = float(item.MeasuredValueSequence[0].NumericValue)
        elif kind == "NUM":
            out[meaning[code].lower()] = float(item.MeasuredValueSequence[0].NumericValue)
        elif kind == "TEXT":
            out[meaning[code].lower()] = item.TextValue
        elif kind == "CODE":
            out[meaning[code].lower()] = item.ConceptCodeSequence[0].CodeValue
        elif kind == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            out["source"] = (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
            frames = ref.get("ReferencedFrameNumber")
            out["frame"] = None if frames is None else int(frames if not isinstance(frames, list) else frames[0]) - 1
    return out


def render_text(ds) -> str:
    """The SR as a radiologist's viewer lists it (title, then one line per item)."""
    values = read_sr(ds)
    lines = [f"{ds.ConceptNameCodeSequence[0].CodeMeaning} ({ds.SeriesDescription})"]
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            lines.append(f"  {name}: {item.TextValue}")
        elif item.ValueType == "NUM":
            lines.append(f"  {name}: {float(item.MeasuredValueSequence[0].NumericValue):.4f}")
        elif item.ValueType == "CODE":
            lines.append(f"  {name}: {item.ConceptCodeSequence[0].CodeMeaning}")
        elif item.ValueType == "IMAGE":
            frame = "" if values["frame"] is None else f", frame {values['frame'] + 1}"
            lines.append(f"  {name}: image {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}{frame}")
    return "\n".join(lines)

"""The family-held-out validation scheme: whole acquisition families and the latest patient range
held out together, never a family or a patient on both sides."""

import pandas as pd
import pytest

from medclf.config import ConfigError, DataConfig, load_config
from medclf.data.labelled import VAL_GROUP_COLUMN, assign_validation, family_of, patient_id_of

REGEX_FAMILY = r"^(NORMAL2-IM|IM|person)"
REGEX_PATIENT = r"^((?:NORMAL2-)?IM-\d+|person\d+)"


def archive() -> pd.DataFrame:
    rows = []
    for n in range(100, 160):  # two normal families, two images each
        rows += [(f"/a/NORMAL/IM-{n:04d}-000{k}.jpeg", "NORMAL") for k in (1, 2)]
    for n in range(300, 380):
        rows.append((f"/a/NORMAL/NORMAL2-IM-{n:04d}-0001.jpeg", "NORMAL"))
    for n in range(1, 201):  # one pneumonia family, 1-3 images per patient
        rows += [(f"/a/PNEUMONIA/person{n}_bacteria_{k}.jpeg", "PNEUMONIA") for k in range(1 + n % 3)]
    df = pd.DataFrame(rows, columns=["path", "label"])
    df["split"] = "train"
    df["patient_id"] = [patient_id_of(p, REGEX_PATIENT) for p in df["path"]]
    return df


def family_config(**kw) -> DataConfig:
    return DataConfig(val_scheme="family", family_regex=REGEX_FAMILY, patient_regex=REGEX_PATIENT,
                      val_fraction=0.1, **{"holdout_families": ["IM"], "holdout_id_fraction": 0.25, **kw})


def test_family_split_never_puts_a_family_or_patient_on_both_sides():
    df = assign_validation(archive(), family_config(), seed=0)
    df["family"] = df["path"].map(lambda p: family_of(p, REGEX_FAMILY))
    held = df[df[VAL_GROUP_COLUMN] == "family"]
    train = df[df["split"] == "train"]
    assert set(held["family"]) == {"IM", "person"}  # NORMAL2-IM: its class is covered by IM
    assert not set(held.loc[held["family"] == "IM", "path"]) ^ set(df.loc[df["family"] == "IM", "path"])
    assert "IM" not in set(train["family"])  # the held-out family is wholly on the validation side
    for side in (train, df[df["split"] == "val"]):
        other = df[(df["split"] != side["split"].iloc[0])]
        assert not set(side["patient_id"]) & set(other["patient_id"])
    # pneumonia (no held-out family) loses its latest quarter of patients, by number, as one range
    persons = held.loc[held["family"] == "person", "patient_id"].str.replace("person", "").astype(int)
    assert set(persons) == set(range(151, 201))
    # and the usual patient-level part comes from what is left, both classes present
    patient_part = df[df[VAL_GROUP_COLUMN] == "patient"]
    assert set(patient_part["label"]) == {"NORMAL", "PNEUMONIA"}
    assert "IM" not in set(patient_part["family"])
    part_persons = patient_part.loc[patient_part["family"] == "person", "patient_id"].str.replace("person", "")
    assert (part_persons.astype(int) <= 150).all()
    # deterministic for a seed
    again = assign_validation(archive(), family_config(), seed=0)
    assert (again["split"] == df["split"]).all()


def test_family_scheme_can_hold_out_the_earliest_range_of_every_family():
    df = assign_validation(archive(), family_config(holdout_families=[], holdout_id_end="low"), seed=0)
    held = df[df[VAL_GROUP_COLUMN] == "family"]
    numbers = held["patient_id"].str.extract(r"(\d+)$")[0].astype(int)
    fams = held["path"].map(lambda p: family_of(p, REGEX_FAMILY))
    assert set(numbers[fams == "IM"]) == set(range(100, 115))
    assert set(numbers[fams == "NORMAL2-IM"]) == set(range(300, 320))
    assert set(numbers[fams == "person"]) == set(range(1, 51))
    assert not set(held["patient_id"]) & set(df.loc[df["split"] == "train", "patient_id"])


def test_patient_scheme_marks_its_validation_rows():
    df = assign_validation(archive(), DataConfig(patient_regex=REGEX_PATIENT, val_fraction=0.2), seed=0)
    assert set(df.loc[df["split"] == "val", VAL_GROUP_COLUMN]) == {"patient"}
    assert df.loc[df["split"] == "train", VAL_GROUP_COLUMN].isna().all()


def test_family_scheme_config_errors_are_clear():
    with pytest.raises(ConfigError, match="family_regex and data.holdout_families and/or"):
        load_config(None, ["data.val_scheme=family", "data.family_regex='(x)'"])
    from medclf.imaging.manifest import DatasetError
    with pytest.raises(DatasetError, match=r"holdout_families \['CT'\] match no file name"):
        assign_validation(archive(), DataConfig(val_scheme="family", family_regex=REGEX_FAMILY,
                                                holdout_families=["CT"]), seed=0)

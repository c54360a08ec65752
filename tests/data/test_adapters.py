"""Each adapter on small fixture files in its native format, with the edge cases of the real releases."""

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.data.adapters import read_manifest
from pipelines.data.schema import MANIFEST_COLUMNS, apply_label_policy


def row(manifest: pd.DataFrame, image_id: str) -> pd.Series:
    found = manifest[manifest["image_id"] == image_id]
    assert len(found) == 1, image_id
    return found.iloc[0]


def is_null(value) -> bool:
    return bool(pd.isna(value))


MIMIC_METADATA = """dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning
0a1b2c3d-11111111-22222222-33333333-44444444,10000001,50000001,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect
0a1b2c3d-55555555-66666666-77777777-88888888,10000001,50000001,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect
9f8e7d6c-11111111-22222222-33333333-44444444,10000001,50000002,CHEST (PORTABLE AP),AP,2539,3050,21810102,84707.0,CHEST (PORTABLE AP),antero-posterior,
1234abcd-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd,11000002,51000003,CHEST (PA AND LAT),,2022,2022,21520317,101500.0,CHEST (PA AND LAT),,
5555abcd-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd,12000003,52000004,CHEST (PA AND LAT),PA,2022,2022,21520317,101500.0,CHEST (PA AND LAT),,
"""
MIMIC_SPLIT = """dicom_id,study_id,subject_id,split
0a1b2c3d-11111111-22222222-33333333-44444444,50000001,10000001,train
9f8e7d6c-11111111-22222222-33333333-44444444,50000002,10000001,validate
1234abcd-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd,51000003,11000002,test
"""
MIMIC_CHEXPERT = """subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
10000001,50000001,,,,,,,,,1.0,,,,,
10000001,50000002,1.0,-1.0,,0.0,,,,1.0,,1.0,,-1.0,0.0,1.0
11000002,51000003,-1.0,1.0,0.0,,,,,,,0.0,,0.0,,
"""
MIMIC_PATIENTS = """subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000001,F,52,2180,2014 - 2016,
11000002,M,91,2150,2008 - 2010,2152-03-01
"""


def test_mimic(tmp_path):
    root = tmp_path / "2.0.0"
    root.mkdir()
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(MIMIC_METADATA)
    # Some mirrors ship gzipped CSVs: both must be accepted.
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(MIMIC_SPLIT.encode()))
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(MIMIC_CHEXPERT)
    (root / "hosp").mkdir()
    (root / "hosp" / "patients.csv").write_text(MIMIC_PATIENTS)
    m = read_manifest("mimic-cxr-jpg", root, "mimic")
    assert list(m.columns) == list(MANIFEST_COLUMNS) and len(m) == 5

    first = row(m, "0a1b2c3d-11111111-22222222-33333333-44444444")
    assert first["patient_id"] == "10000001" and first["study_id"] == "50000001"
    assert first["path"] == str(root / "files/p10/p10000001/s50000001/0a1b2c3d-11111111-22222222-33333333-44444444.jpg")
    assert (first["view"], first["sex"], first["age"], first["split"]) == ("PA", "F", 52.0, "train")
    assert first["no_finding"] == 1.0 and is_null(first["atelectasis"])
    assert row(m, "0a1b2c3d-55555555-66666666-77777777-88888888")["view"] == "LATERAL"

    follow_up = row(m, "9f8e7d6c-11111111-22222222-33333333-44444444")
    assert follow_up["age"] == 53.0          # anchor age 52 in 2180, study in 2181
    assert follow_up["split"] == "val"
    assert (follow_up["atelectasis"], follow_up["cardiomegaly"], follow_up["pleural_effusion"],
            follow_up["pneumonia"]) == (1.0, -1.0, 1.0, -1.0)
    assert is_null(follow_up["no_finding"])

    top_coded = row(m, "1234abcd-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd")
    assert top_coded["view"] == "OTHER" and top_coded["age"] == 90.0 and top_coded["sex"] == "M"
    # A subject missing from patients.csv and a study without a label row: nulls, not errors.
    orphan = row(m, "5555abcd-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd")
    assert is_null(orphan["sex"]) and is_null(orphan["age"]) and is_null(orphan["split"])
    assert all(is_null(orphan[label]) for label in ("atelectasis", "no_finding"))


CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices\n"
CHEXPERT_TRAIN = CHEXPERT_HEADER + """CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,83,Frontal,PA,,,-1.0,1.0,,,-1.0,,1.0,,1.0,,,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Male,83,Lateral,,,,-1.0,1.0,,,-1.0,,1.0,,1.0,,,
CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.jpg,Unknown,0,Frontal,LL,,,,,,1.0,,-1.0,,0.0,0.0,,,
"""
CHEXPERT_VALID = CHEXPERT_HEADER + """CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
"""


def test_chexpert(tmp_path):
    (tmp_path / "train.csv").write_text(CHEXPERT_TRAIN)
    (tmp_path / "valid.csv").write_text(CHEXPERT_VALID)
    m = read_manifest("chexpert", tmp_path, "chexpert")
    assert len(m) == 5
    first = row(m, "train/patient00001/study1/view1_frontal.jpg")
    assert first["path"] == str(tmp_path / "train/patient00001/study1/view1_frontal.jpg")
    assert (first["patient_id"], first["study_id"]) == ("patient00001", "patient00001/study1")
    assert (first["sex"], first["age"], first["view"], first["split"]) == ("F", 68.0, "AP", "train")
    assert first["no_finding"] == 1.0 and is_null(first["cardiomegaly"])
    second = row(m, "train/patient00002/study1/view1_frontal.jpg")
    assert (second["cardiomegaly"], second["atelectasis"], second["pleural_effusion"]) == (-1.0, 1.0, 1.0)
    assert is_null(second["pneumonia"]) and second["view"] == "PA"
    assert row(m, "train/patient00002/study1/view2_lateral.jpg")["view"] == "LATERAL"
    odd = row(m, "train/patient00003/study2/view1_frontal.jpg")
    assert is_null(odd["sex"]) and is_null(odd["age"]) and odd["view"] == "OTHER" and odd["pneumonia"] == -1.0
    valid = row(m, "valid/patient64541/study1/view1_frontal.jpg")
    assert valid["split"] == "val" and valid["no_finding"] == 0.0 and valid["cardiomegaly"] == 1.0


def write_jpeg(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path, quality=90)


CHEXPERT_FULL_TRAIN = CHEXPERT_HEADER + """CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0/train/patient00002/study1/view1_frontal.jpg,Male,83,Frontal,PA,,,-1.0,1.0,,,-1.0,,1.0,,1.0,,,
CheXpert-v1.0/train/patient00003/study2/view1_frontal.jpg,Female,41,Frontal,PA,,,1.0,,,,,,,,,,,
"""
CHEXPERT_FULL_VALID = CHEXPERT_HEADER + """CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
"""
CHEXPERT_TEST = CHEXPERT_HEADER + """test/patient64741/study1/view1_frontal.jpg,Female,55,Frontal,PA,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0
"""


def test_chexpert_full_release_in_batch_folders_with_the_labelled_test_set(tmp_path):
    """The high-resolution download: CSVs and valid/ in batch 1, training patients spread over batches 2-4 with no
    train/ folder; the labelled test set beside them keeps its test/ prefix."""
    batch1 = tmp_path / "CheXpert-v1.0 batch 1 (validate & csv)"
    batch1.mkdir()
    (batch1 / "train.csv").write_text(CHEXPERT_FULL_TRAIN)
    (batch1 / "valid.csv").write_text(CHEXPERT_FULL_VALID)
    (tmp_path / "test_labels.csv").write_text(CHEXPERT_TEST)
    files = [batch1 / "valid/patient64541/study1/view1_frontal.jpg",
             tmp_path / "CheXpert-v1.0 batch 2 (train 1)/patient00001/study1/view1_frontal.jpg",
             tmp_path / "CheXpert-v1.0 batch 3 (train 2)/patient00002/study1/view1_frontal.jpg",
             tmp_path / "CheXpert-v1.0 batch 4 (train 3)/patient00003/study2/view1_frontal.jpg",
             tmp_path / "test/patient64741/study1/view1_frontal.jpg"]
    for file in files:
        write_jpeg(file)
    m = read_manifest("chexpert", tmp_path, "chexpert")
    assert sorted(m["path"]) == sorted(str(f) for f in files) and all(Path(p).is_file() for p in m["path"])
    first = row(m, "train/patient00001/study1/view1_frontal.jpg")
    assert (first["split"], first["sex"], first["no_finding"]) == ("train", "F", 1.0)
    assert row(m, "valid/patient64541/study1/view1_frontal.jpg")["split"] == "val"
    test = row(m, "test/patient64741/study1/view1_frontal.jpg")         # the test/ prefix is kept
    assert (test["split"], test["patient_id"], test["pleural_effusion"]) == ("test", "patient64741", 1.0)


def test_chexpert_image_missing_from_every_batch_points_where_it_was_listed(tmp_path):
    (tmp_path / "train.csv").write_text(CHEXPERT_FULL_TRAIN)
    write_jpeg(tmp_path / "train/patient00001/study1/view1_frontal.jpg")
    m = read_manifest("chexpert", tmp_path, "chexpert")
    assert row(m, "train/patient00001/study1/view1_frontal.jpg")["path"] == str(
        tmp_path / "train/patient00001/study1/view1_frontal.jpg")
    # Not on disk: prepare reports it unreadable at the path the CSV implies.
    assert row(m, "train/patient00002/study1/view1_frontal.jpg")["path"] == str(
        tmp_path / "train/patient00002/study1/view1_frontal.jpg")


def mimic_release(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(MIMIC_METADATA)
    (root / "mimic-cxr-2.0.0-split.csv").write_text(MIMIC_SPLIT)
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(MIMIC_CHEXPERT)


def test_mimic_iv_patients_from_core_or_outside_the_jpeg_tree(tmp_path, monkeypatch):
    root = tmp_path / "physionet.org/files/mimic-cxr-jpg/2.0.0"
    mimic_release(root)
    (root / "core").mkdir()                                   # MIMIC-IV 1.0 layout, gzipped as downloaded
    (root / "core/patients.csv.gz").write_bytes(gzip.compress(MIMIC_PATIENTS.encode()))
    assert row(read_manifest("mimic-cxr-jpg", root, "mimic"), "1234abcd-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd")[
        "age"] == 90.0
    (root / "core/patients.csv.gz").unlink()
    mimic_iv = tmp_path / "physionet.org/files/mimiciv/2.2/hosp"
    mimic_iv.mkdir(parents=True)
    (mimic_iv / "patients.csv.gz").write_bytes(gzip.compress(MIMIC_PATIENTS.encode()))
    monkeypatch.chdir(tmp_path)
    # params.yaml options are strings, relative to the working directory like the site's path.
    m = read_manifest("mimic-cxr-jpg", root, "mimic", patients_csv="physionet.org/files/mimiciv/2.2/hosp/patients.csv.gz")
    assert row(m, "0a1b2c3d-11111111-22222222-33333333-44444444")["sex"] == "F"


def test_mimic_patients_errors_name_the_columns_and_the_option(tmp_path, monkeypatch):
    root = tmp_path / "2.0.0"
    mimic_release(root)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"patients.csv\(.gz\) is not in .*2.0.0/core: it is a separate "
                       r"download .*options: \{patients_csv: <MIMIC-IV>/hosp/patients.csv.gz\}"):
        read_manifest("mimic-cxr-jpg", root, "mimic")
    Path("admissions.csv").write_text("subject_id,hadm_id,admittime,dischtime\n10000001,20000001,2180-05-06,\n")
    with pytest.raises(ValueError, match=r"^admissions.csv lacks the columns \['gender', 'anchor_age', 'anchor_year'\] "
                       r"of MIMIC-IV's patients table .*options: \{patients_csv:") as error:
        read_manifest("mimic-cxr-jpg", root, "mimic", patients_csv="admissions.csv")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"options.patients_csv: nowhere/patients.csv does not exist"):
        read_manifest("mimic-cxr-jpg", root, "mimic", patients_csv="nowhere/patients.csv")
    with pytest.raises(ValueError, match=r"site 'mimic': unknown option\(s\) \['patient_csv'\] for format "
                       r"mimic-cxr-jpg; it takes \['patients_csv'\]"):
        read_manifest("mimic-cxr-jpg", root, "mimic", patient_csv="admissions.csv")


def test_an_unexpected_label_value_names_the_file_the_column_and_the_value(tmp_path):
    (tmp_path / "train.csv").write_text(CHEXPERT_TRAIN)
    (tmp_path / "valid.csv").write_text(CHEXPERT_VALID.replace(",0.0,1.0,1.0,1.0,", ",0.0,1.0,2.0,1.0,", 1))
    with pytest.raises(ValueError, match=r"valid.csv: column 'Cardiomegaly' has the value '2.0'; labels are 1.0, 0.0, "
                       r"-1.0 or blank") as error:
        read_manifest("chexpert", tmp_path, "chexpert")
    assert "\n" not in str(error.value)


NIH_V2020 = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002
00000001_001.png,Cardiomegaly|Effusion,1,1,58,M,PA,2500,2048,0.168,0.168
00000002_000.png,No Finding,0,2,80,F,AP,2500,2048,0.171,0.171
00000003_000.png,Atelectasis|Infiltration|Pneumonia,0,3,0,F,AP,2048,2500,0.139,0.139
00000004_000.png,Infiltration|Consolidation,0,4,45,F,PA,2048,2500,0.139,0.139
"""
NIH_2017 = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000005_000.png,Effusion,0,5,148,M,PA,2500,2048,0.168,0.168,
00000006_000.png,No Finding,0,6,33,F,PA,2500,2048,0.168,0.168,
"""


def test_chestxray14_v2020_with_nested_images_and_split_lists(tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(NIH_V2020)
    (tmp_path / "test_list.txt").write_text("00000001_001.png\n00000003_000.png\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png\n")
    nested = tmp_path / "images_002" / "images"
    nested.mkdir(parents=True)
    (nested / "00000002_000.png").write_bytes(b"")
    m = read_manifest("chestxray14", tmp_path, "nih")
    assert row(m, "00000002_000.png")["path"] == str(nested / "00000002_000.png")
    assert row(m, "00000001_001.png")["split"] == "test" and is_null(row(m, "00000004_000.png")["split"])
    both = row(m, "00000001_001.png")
    assert (both["cardiomegaly"], both["pleural_effusion"], both["no_finding"], both["atelectasis"]) == (1, 1, 0, 0)
    assert both["patient_id"] == "1" and both["age"] == 58.0 and both["sex"] == "M"
    zero_age = row(m, "00000003_000.png")
    assert is_null(zero_age["age"]) and zero_age["pneumonia"] == 1.0 and zero_age["view"] == "AP"
    # Infiltration and Consolidation are not pneumonia (no substring or synonym matching).
    assert row(m, "00000004_000.png")["pneumonia"] == 0.0
    assert row(m, "00000002_000.png")["no_finding"] == 1.0


def test_chestxray14_original_file_with_trailing_commas(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_2017)
    m = read_manifest("chestxray14", tmp_path, "nih")
    assert len(m) == 2
    assert is_null(row(m, "00000005_000.png")["age"])          # 148 years is not an age
    assert row(m, "00000005_000.png")["pleural_effusion"] == 1.0
    assert row(m, "00000006_000.png")["sex"] == "F"


PADCHEST = """,ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,PhotometricInterpretation_DICOM,PixelRepresentation_DICOM,PixelAspectRatio_DICOM,SpatialResolution_DICOM,BitsStored_DICOM,WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,ExposureInuAs_DICOM,ExposureTime,RelativeXRayExposure_DICOM,ReportID,Report,MethodLabel,Labels,Localizations,LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS
0,11111111111111111111111111111111111111_abc123.png,0,20140915,11111111111111111111111111111111111111,222222222222222222222222222222222222222,1930.0,F,POSTEROANTERIOR,PA,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,"['1', '1']",0.143,12,2047.0,4095.0,2140,1760,,,None,,186.0,4000001,sin hallazg patolog edad pacient .,Physician,['normal'],[],"[['normal'], ['normal']]",['C0205307'],[]
1,11111111111111111111111111111111111111_abc124.png,0,20140915,11111111111111111111111111111111111111,222222222222222222222222222222222222222,1930.0,F,LATERAL,L,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,"['1', '1']",0.143,12,2047.0,4095.0,2140,1760,,,None,,398.0,4000001,sin hallazg patolog edad pacient .,Physician,['normal'],[],"[['normal'], ['normal']]",['C0205307'],[]
2,33333333333333333333333333333333333333_def456.png,12,20160302,33333333333333333333333333333333333333,444444444444444444444444444444444444444,1948.0,M,,AP_horizontal,resnet-50.t7,No,DX,PhilipsMedicalSystems,MONOCHROME1,0,,0.2,12,2047.0,4095.0,1760,2140,250.0,3.0,2500.0,10.0,419.0,4000002,derram pleural bilateral . cardiomegalia .,RNN_model,"['pleural effusion', 'cardiomegaly', 'laminar atelectasis']","['loc bilateral']","[['pleural effusion', 'loc bilateral'], ['cardiomegaly'], ['laminar atelectasis']]","['C2073625' 'C0018800'
 '']",['C0238767']
3,216840111366964000000000000000000000000_00-001-001.png,54,20090112,216840111366964000000000000000000000000,555555555555555555555555555555555555555,,O,,COSTAL,Manual review of DICOM fields,PED,CR,PhilipsMedicalSystems,MONOCHROME2,0,,,10,511.5,765.0,680,740,,,None,,,4000003,,RNN_model,nan,[],[],[],[]
4,66666666666666666666666666666666666666_ghi789.png,13.0,20170101,66666666666666666666666666666666666666,777777777777777777777777777777777777777,1950.0,M,,PA,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,,,12,,,,,,,None,,,4000004,,Physician,"[' Pericardial effusion', 'abnormal foreign body ', '']",[],[],[],[]
"""


def test_padchest(tmp_path):
    (tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text(PADCHEST)
    (tmp_path / "13").mkdir()
    (tmp_path / "13" / "66666666666666666666666666666666666666_ghi789.png").write_bytes(b"")
    m = read_manifest("padchest", tmp_path, "padchest")
    assert len(m) == 5                                    # the quoted newline did not split a row
    normal = row(m, "11111111111111111111111111111111111111_abc123.png")
    assert normal["patient_id"] == "222222222222222222222222222222222222222"   # all 39 digits kept
    assert (normal["sex"], normal["age"], normal["view"]) == ("F", 84.0, "PA")
    assert normal["no_finding"] == 1.0 and normal["pleural_effusion"] == 0.0
    assert row(m, "11111111111111111111111111111111111111_abc124.png")["view"] == "LATERAL"
    sick = row(m, "33333333333333333333333333333333333333_def456.png")
    assert sick["view"] == "AP" and sick["age"] == 68.0
    assert (sick["pleural_effusion"], sick["cardiomegaly"], sick["atelectasis"], sick["no_finding"]) == (1, 1, 1, 0)
    costal = row(m, "216840111366964000000000000000000000000_00-001-001.png")
    assert costal["view"] == "OTHER" and is_null(costal["sex"]) and is_null(costal["age"])
    assert is_null(costal["no_finding"])                 # Labels 'nan': not assessed
    # Exact items only: a pericardial effusion is no pleural effusion, an abnormal foreign body is not normal.
    traps = row(m, "66666666666666666666666666666666666666_ghi789.png")
    assert traps["pleural_effusion"] == 0.0 and traps["no_finding"] == 0.0
    assert traps["path"] == str(tmp_path / "13" / "66666666666666666666666666666666666666_ghi789.png")


PADCHEST_NOT_ASSESSED = PADCHEST.splitlines()[0] + "\n" + "\n".join(
    f"{i},{i}0000000000000000000000000000000000000_x{i}.png,0,20170606,{i}000000000000000000000000000000000000000,"
    f"9{i}00000000000000000000000000000000000000,{birth},F,,PA,Manual review of DICOM fields,No,CR,Philips,MONOCHROME2,0,"
    f",,12,,,,,,,None,,,400000{i},,Physician,\"{labels}\",[],[],[],[]"
    for i, (labels, birth) in enumerate([("['exclude']", "1950.0"), ("['suboptimal study']", "1950.0"),
                                         ("[' Unchanged ']", "1950.0"), ("['unchanged', 'cardiomegaly']", "1950.0"),
                                         ("['normal']", "2017.0")], start=5)) + "\n"


def test_padchest_rows_nobody_assessed_are_excluded_never_negative_and_infants_keep_age_0(tmp_path):
    (tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text(PADCHEST_NOT_ASSESSED)
    m = read_manifest("padchest", tmp_path, "padchest").set_index("image_id")
    for name in ("50000000000000000000000000000000000000_x5.png", "60000000000000000000000000000000000000_x6.png",
                 "70000000000000000000000000000000000000_x7.png"):
        assert m.at[name, "excluded"] == "non-assessable"
        assert all(is_null(m.at[name, label]) for label in ("atelectasis", "cardiomegaly", "no_finding"))
    compared = m.loc["80000000000000000000000000000000000000_x8.png"]     # "unchanged" beside a finding: assessed
    assert is_null(compared["excluded"]) and compared["cardiomegaly"] == 1.0 and compared["no_finding"] == 0.0
    infant = m.loc["90000000000000000000000000000000000000_x9.png"]
    assert infant["age"] == 0.0 and infant["no_finding"] == 1.0


VINDR_LABELS = "Aortic enlargement,Atelectasis,Calcification,Cardiomegaly,Clavicle fracture,Consolidation,Edema,Emphysema,Enlarged PA,ILD,Infiltration,Lung Opacity,Lung cavity,Lung cyst,Mediastinal shift,Nodule/Mass,Pleural effusion,Pleural thickening,Pneumothorax,Pulmonary fibrosis,Rib fracture,Other lesion,COPD,Lung tumor,Pneumonia,Tuberculosis"
VINDR_TRAIN = f"""image_id,rad_id,{VINDR_LABELS},Other diseases,No finding
000434271f63a053c4128a0ba6352c7f,R2,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1
000434271f63a053c4128a0ba6352c7f,R3,0,0,0,1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,1,0
000434271f63a053c4128a0ba6352c7f,R6,0,1,0,1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,1,0,0,0
"""
VINDR_TEST = f"""image_id,{VINDR_LABELS},Other disease,No finding
ffffabcd0123456789abcdef01234567,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1
"""


def write_dicom(path: Path, **tags: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3.4"
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = np.arange(64, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# Readers: R2 "no finding"; R3 cardiomegaly + effusion; R6 atelectasis + cardiomegaly + effusion + pneumonia. Under
# `any` a finding needs one reader and "no finding" all three, so the image is never both.
@pytest.mark.parametrize("aggregation, expected", [("majority", (0, 1, 1, 0, 0)), ("any", (1, 1, 1, 1, 0))])
def test_vindr_aggregation_and_dicom_demographics(tmp_path, aggregation, expected):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "image_labels_train.csv").write_text(VINDR_TRAIN)
    (tmp_path / "annotations" / "image_labels_test.csv").write_text(VINDR_TEST)
    write_dicom(tmp_path / "train" / "000434271f63a053c4128a0ba6352c7f.dicom", PatientSex="F", PatientAge="045Y")
    write_dicom(tmp_path / "test" / "ffffabcd0123456789abcdef01234567.dicom", PatientAge="000Y")
    m = read_manifest("vindr-cxr", tmp_path, "vindr", aggregation=aggregation)
    train = row(m, "000434271f63a053c4128a0ba6352c7f")
    got = tuple(int(train[k]) for k in ("atelectasis", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding"))
    assert got == expected
    assert (train["sex"], train["age"], train["split"], train["patient_id"]) == ("F", 45.0, "train", train["image_id"])
    test = row(m, "ffffabcd0123456789abcdef01234567")
    assert test["split"] == "test" and test["no_finding"] == 1.0
    assert is_null(test["sex"]) and is_null(test["age"])    # no PatientSex tag, age 000Y


def test_inhouse_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "masterlist.csv").write_text("image_id,patient_id,study_id,path,view,sex\nA,P,S,a.png,PA,F\n")
    with pytest.raises(ValueError, match=r"masterlist.csv lacks columns \['age'"):
        read_manifest("inhouse", tmp_path, "site")


def test_unknown_format_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown data set format 'dicomdir'"):
        read_manifest("dicomdir", tmp_path, "site")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest("chexpert", tmp_path / "nowhere", "site")


def test_label_policy_makes_labels_binary():
    frame = pd.DataFrame({label: [1.0, 0.0, -1.0, np.nan] for label in
                          ("atelectasis", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding")})
    as_negative = apply_label_policy(frame, uncertain="negative", not_mentioned="negative")
    assert as_negative["atelectasis"].tolist() == [1, 0, 0, 0]
    u_ones = apply_label_policy(frame, uncertain="positive", not_mentioned="negative")
    assert u_ones["atelectasis"].tolist() == [1, 0, 1, 0]

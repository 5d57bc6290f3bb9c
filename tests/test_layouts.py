"""Detecting and reading every official RSNA/Kaggle layout, and the generic CSV, into one normalised table."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from bonedist import BonedistError
from bonedist.data.layouts import GenericCSV, parse_male, read_table


def _png_bytes(value: int = 100) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((20, 16), value, np.uint8))
    return buf.tobytes()


def _images(folder: Path, ids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (folder / f"{i}.png").write_bytes(_png_bytes())


def _by_id(table) -> dict:
    return {r["id"]: r for r in table.records.to_dict("records")}


def test_kaggle_training_layout_doubly_nested(tmp_path):
    _images(tmp_path / "boneage-training-dataset" / "boneage-training-dataset", [1377, 1378])
    (tmp_path / "boneage-training-dataset.csv").write_text("id,boneage,male\n1377,180,False\n1378,12,True\n")
    table = read_table(tmp_path)
    rows = _by_id(table)
    assert set(rows) == {"1377", "1378"}
    assert rows["1377"] == {**rows["1377"], "split": "train", "boneage_months": 180.0, "male": False,
                            "source": "boneage-training-dataset/boneage-training-dataset/1377.png"}
    assert rows["1378"]["male"] is True
    assert table.layouts[0]["layout"] == "kaggle-train" and not table.skipped


def test_rsna_train_csv_with_single_folder(tmp_path):
    _images(tmp_path / "boneage-training-dataset", [5, 6])
    (tmp_path / "train.csv").write_text("id,boneage,male\n5,100,TRUE\n6,36.5,false\n")
    rows = _by_id(read_table(tmp_path))
    assert rows["5"]["male"] is True and rows["6"]["boneage_months"] == 36.5 and rows["6"]["male"] is False
    assert read_table(tmp_path).layouts[0]["layout"] == "rsna-train"


@pytest.mark.parametrize("zipped", [True, False])
def test_validation_layout_zipped_or_extracted(tmp_path, zipped):
    if zipped:
        for part, ids in ((1, [1386, 1387]), (2, [1400])):
            with zipfile.ZipFile(tmp_path / f"boneage-validation-dataset-{part}.zip", "w") as zf:
                for i in ids:
                    zf.writestr(f"boneage-validation-dataset-{part}/{i}.png", _png_bytes())
    else:
        _images(tmp_path / "boneage-validation-dataset-1" / "boneage-validation-dataset-1", [1386, 1387])
        _images(tmp_path / "boneage-validation-dataset-2", [1400])
    (tmp_path / "Validation Dataset.csv").write_text(
        "Image ID,male,Bone Age (months)\n1386,FALSE,30\n1387,TRUE,162\n1400,TRUE,96\n")
    rows = _by_id(read_table(tmp_path))
    assert set(rows) == {"1386", "1387", "1400"} and all(r["split"] == "validation" for r in rows.values())
    assert rows["1386"]["male"] is False and rows["1387"]["boneage_months"] == 162.0
    if zipped:
        assert rows["1400"]["source"] == "boneage-validation-dataset-2.zip!boneage-validation-dataset-2/1400.png"


def test_rsna_test_xlsx_with_decimal_ages(tmp_path):
    _images(tmp_path / "boneage-test-dataset", [4360, 4361])
    pd.DataFrame({"Case ID": [4360, 4361], "Sex": ["M", "F"],
                  "Ground truth bone age (months)": [168.93, 169.64]}).to_excel(
        tmp_path / "Bone age ground truth.xlsx", index=False)
    rows = _by_id(read_table(tmp_path))
    assert rows["4360"]["male"] is True and rows["4361"]["male"] is False
    assert rows["4361"]["boneage_months"] == pytest.approx(169.64) and rows["4360"]["split"] == "test"


def test_kaggle_test_csv_without_ages(tmp_path):
    _images(tmp_path / "boneage-test-dataset" / "boneage-test-dataset", [4360, 4361])
    (tmp_path / "boneage-test-dataset.csv").write_text("Case ID,Sex\n4360,M\n4361,F\n")
    table = read_table(tmp_path)
    rows = _by_id(table)
    assert len(rows) == 2 and all(pd.isna(r["boneage_months"]) for r in rows.values())
    assert table.layouts[0]["layout"] == "kaggle-test"


def test_xlsx_wins_over_kaggle_test_csv(tmp_path):
    _images(tmp_path / "boneage-test-dataset", [1])
    (tmp_path / "boneage-test-dataset.csv").write_text("Case ID,Sex\n1,M\n")
    pd.DataFrame({"Case ID": [1], "Sex": ["M"], "Ground truth bone age (months)": [50.0]}).to_excel(
        tmp_path / "Bone age ground truth.xlsx", index=False)
    table = read_table(tmp_path)
    assert _by_id(table)["1"]["boneage_months"] == 50.0
    assert [entry["used"] for entry in table.layouts] == [True, False]


def test_all_splits_of_the_phantom_set(phantom_root):
    table = read_table(phantom_root)
    counts = table.records["split"].value_counts().to_dict()
    assert counts == {"train": 24, "validation": 8, "test": 8}
    assert {entry["layout"] for entry in table.layouts} == {"kaggle-train", "rsna-validation", "rsna-test"}
    assert not table.skipped


@pytest.mark.parametrize("value, male", [("True", True), ("FALSE", False), ("M", True), ("F", False),
                                         ("male", True), ("Female", False), ("1", True), (0, False),
                                         ("x", None), ("", None), (float("nan"), None)])
def test_sex_values(value, male):
    assert parse_male(value) is male


def test_unknown_columns_are_reported_and_other_layouts_still_read(tmp_path):
    (tmp_path / "boneage-training-dataset.csv").write_text("image,age,gender\n1,2,M\n")
    _images(tmp_path / "boneage-test-dataset", [9])
    (tmp_path / "boneage-test-dataset.csv").write_text("Case ID,Sex\n9,F\n")
    table = read_table(tmp_path)
    assert list(table.records["id"]) == ["9"]
    assert table.skipped[0]["source"] == "boneage-training-dataset.csv"
    assert "unknown columns" in table.skipped[0]["reason"] and "'boneage'" in table.skipped[0]["reason"]


def test_no_layout_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BonedistError, match="no known bone-age layout"):
        read_table(tmp_path)
    with pytest.raises(BonedistError, match="does not exist"):
        read_table(tmp_path / "missing")


def test_generic_csv_with_paths_years_and_split_column(tmp_path):
    _images(tmp_path / "imgs" / "a", ["x1", "x2", "x3"])
    (tmp_path / "outside.png").write_bytes(_png_bytes())
    (tmp_path / "meta.csv").write_text(
        "file,age_y,sex,part\nimgs/a/x1.png,10,M,train\nimgs/a/x2.png,2.5,F,test\n../outside.png,3,M,train\n"
        "/etc/passwd,3,M,train\nimgs/a/x3.png,4,M,holdout\n")
    spec = GenericCSV(csv=Path("meta.csv"), id_col="file", age_col="age_y", sex_col="sex", path_col="file",
                      split_col="part", age_unit="years")
    table = read_table(tmp_path / "imgs" / "..", generic=spec)
    rows = _by_id(table)
    assert rows["imgs/a/x1.png"]["boneage_months"] == 120.0 and rows["imgs/a/x2.png"]["split"] == "test"
    assert rows["imgs/a/x1.png"]["key"] == "imgs_a_x1_png"  # no dots or slashes in webdataset keys
    reasons = sorted(entry["reason"] for entry in table.skipped)
    assert reasons[:2] == ["image path escapes the data root"] * 2
    assert "unknown split 'holdout'" in reasons[2]


def test_generic_csv_bad_column_flag_names_the_flag(tmp_path):
    (tmp_path / "meta.csv").write_text("id,boneage,male\n1,2,M\n")
    with pytest.raises(BonedistError, match="--age-col"):
        read_table(tmp_path, generic=GenericCSV(csv=Path("meta.csv"), age_col="age"))


def _xlsx(path: Path, ids, ages, sexes) -> None:
    pd.DataFrame({"Case ID": ids, "Sex": sexes, "Ground truth bone age (months)": ages}).to_excel(path, index=False)


def test_official_rsna_names_are_found_however_unpacked(tmp_path):
    """RSNA's own downloads: `Bone Age Training Set`, `Bone Age Validation Set`, `Bone Age Test Set/Test Set
    Images`, one of them still zipped, none named like Kaggle's folders."""
    _images(tmp_path / "Bone Age Training Set" / "boneage-training-dataset", [10, 11])
    (tmp_path / "Bone Age Training Set" / "train.csv").write_text("id,boneage,male\n10,100,True\n11,50,False\n")
    with zipfile.ZipFile(tmp_path / "Bone Age Validation Set.zip", "w") as zf:
        zf.writestr("Bone Age Validation Set/20.png", _png_bytes())
    (tmp_path / "Validation Dataset.csv").write_text("Image ID,male,Bone Age (months)\n20,TRUE,30\n")
    _images(tmp_path / "Bone Age Test Set" / "Test Set Images", [30, 31])
    _xlsx(tmp_path / "Bone Age Test Set" / "Bone age ground truth.xlsx", [30, 31], [12.5, 180.0], ["M", "F"])
    table = read_table(tmp_path)
    rows = _by_id(table)
    assert {k: r["split"] for k, r in rows.items()} == {"10": "train", "11": "train", "20": "validation",
                                                        "30": "test", "31": "test"}
    assert rows["30"]["source"] == "Bone Age Test Set/Test Set Images/30.png"
    assert rows["20"]["source"] == "Bone Age Validation Set.zip!Bone Age Validation Set/20.png"
    assert not table.skipped and not table.errors


def test_an_id_in_several_places_goes_to_its_split_or_is_reported_ambiguous(tmp_path):
    _images(tmp_path / "Bone Age Training Set", [1])
    _images(tmp_path / "Test Set Images", [1])  # the same id in a test folder: the training table takes its own
    (tmp_path / "train.csv").write_text("id,boneage,male\n1,100,True\n2,100,True\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "2.png").write_bytes(_png_bytes() + b"different")  # same score, other bytes
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "2.png").write_bytes(_png_bytes())
    table = read_table(tmp_path)
    rows = _by_id(table)
    assert rows["1"]["source"] == "Bone Age Training Set/1.png"
    assert "2" not in rows
    assert "image 2 is ambiguous" in table.skipped[0]["reason"] and "other/2.png" in table.skipped[0]["reason"]


def test_a_labelled_table_without_any_image_is_an_error(tmp_path):
    _images(tmp_path / "boneage-training-dataset", [1])
    (tmp_path / "boneage-training-dataset.csv").write_text("id,boneage,male\n1,100,True\n")
    _xlsx(tmp_path / "Bone age ground truth.xlsx", [4360, 4361], [12.5, 180.0], ["M", "F"])
    table = read_table(tmp_path)
    assert len(table.errors) == 1 and "Bone age ground truth.xlsx: none of its 2 images was found" in table.errors[0]


def test_links_and_image_dirs_outside_the_root_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _images(outside, [7, 8])
    _images(root / "imgs", [1])
    (root / "imgs" / "7.png").symlink_to(outside / "7.png")  # a file link out
    (root / "imgs" / "sub").symlink_to(outside, target_is_directory=True)  # a folder link out
    (root / "meta.csv").write_text("id,boneage,male\n1,10,M\n7,10,M\n8,10,M\n")
    table = read_table(root, generic=GenericCSV(csv=Path("meta.csv"), image_dir="imgs"))
    assert list(table.records["id"]) == ["1"]
    assert any("outside the data root" in e["reason"] for e in table.skipped)
    for image_dir in ("../outside", str(outside)):
        with pytest.raises(BonedistError, match="--image-dir .* outside the data root"):
            read_table(root, generic=GenericCSV(csv=Path("meta.csv"), image_dir=image_dir))
    # the official layouts: a link out of the root is not followed either
    (root / "boneage-training-dataset").mkdir()
    (root / "boneage-training-dataset" / "8.png").symlink_to(outside / "8.png")
    (root / "boneage-training-dataset.csv").write_text("id,boneage,male\n8,10,True\n")
    table = read_table(root)
    assert "link to outside the data root" in table.skipped[0]["reason"]

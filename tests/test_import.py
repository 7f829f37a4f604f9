"""Tests of dataset_tools.py import: a catalogue CSV (long, wide, FashionAI's label.csv) -> the ASEN-format folder.

The catalogue is written the way spreadsheets write it: a UTF-8 byte-order mark, CRLF line ends, a value with a
comma in quotes, blank cells; one labelled image is missing and one is not an image.

    python -m pytest -q tests/test_import.py
"""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import dataset_tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLOURS = ["Red", "Blue", "Green"]
LENGTHS = ["Short", "Knee, or longer"]  # a comma inside a value: quoted in the CSV
N = 40


def labels_of(i):
    """The catalogue's labels of image i: colour always, length on four images of five (a blank cell else)."""
    out = {"colour": COLOURS[i % 3]}
    if i % 5:
        out["length"] = LENGTHS[i % 2]
    return out


def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([header] + rows)
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # utf-8-sig writes the byte-order mark
        f.write(buf.getvalue())


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    os.makedirs(root / "photos" / "summer")
    rng = np.random.default_rng(0)
    names = [f"photos/summer/item {i:02d}.png" for i in range(N)]  # a space in the name, too
    for n in names:
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / n)
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    names += ["photos/broken.jpg", "photos/gone.jpg"]
    wide = [[n] + [labels_of(i).get(a, "") for a in ("colour", "length")] for i, n in enumerate(names)]
    long = [[n, a, v] for i, n in enumerate(names) for a, v in labels_of(i).items()]
    long.append([names[3], "length", ""])  # a blank value: not a label
    write_csv(root / "wide.csv", ["path", "colour", "length"], wide)
    write_csv(root / "long.csv", ["path", "attribute", "value"], long)
    return root


def read_folder(out):
    files = {f: open(os.path.join(out, f), encoding="utf-8").read() for f in data.ASEN_FILES}
    meta = json.loads(files.pop("meta.json"))
    return files, meta


def labels_in_folder(out):
    """{image path: {attribute: value name}} from the written split files, every split."""
    meta = data.load_meta("custom", out)
    found = {}
    for split in ("train", "valid", "test"):
        names = data.read_filenames(os.path.join(out, f"filenames_{split}.txt"))
        lists = ["label_train.txt"] if split == "train" else [f"query_{split}.txt", f"candidate_{split}.txt"]
        for lst in lists:
            rows = data.read_labels(os.path.join(out, lst), len(names), meta, multi=split == "train")
            for fid, a, v in rows:
                path = os.path.normpath(os.path.join(out, names[fid]))
                found.setdefault(path, {})[meta["attributes"][a]] = meta["values"][a][v]
    return found


def test_both_layouts_give_the_expected_folder(shop, tmp_path):
    logs = []
    s_long = dataset_tools.import_catalogue(str(shop / "long.csv"), str(tmp_path / "a"), log=logs.append)
    s_wide = dataset_tools.import_catalogue(str(shop / "wide.csv"), str(tmp_path / "b"), log=logs.append)
    assert s_long["format"] == "long" and s_wide["format"] == "wide"
    fa, ma = read_folder(tmp_path / "a")
    fb, mb = read_folder(tmp_path / "b")
    assert fa == fb  # the same labels in either layout: byte-identical split files
    for m in (ma, mb):
        assert m["ATTRIBUTES"] == ["colour", "length"]
        assert m["ATTRIBUTES_VALUES"] == {"colour": sorted(COLOURS), "length": sorted(LENGTHS)}
        assert m["ATTRIBUTES_NUM"] == {"colour": 3, "length": 2}
    # the missing and the corrupt image are reported and left out; every other image keeps exactly its labels
    assert [os.path.basename(p) for p in s_long["missing"]] == ["gone.jpg"]
    assert len(s_long["unreadable"]) == 1 and "broken.jpg" in s_long["unreadable"][0]
    assert any("missing images (left out): 1" in line for line in logs)
    assert any("Knee, or longer" in line for line in logs)  # value names in the report
    expected = {os.path.normpath(str(shop / f"photos/summer/item {i:02d}.png")): labels_of(i) for i in range(N)}
    assert labels_in_folder(str(tmp_path / "a")) == expected
    # 80 / 10 / 10 by image; per attribute about one query to four candidates
    assert s_long["splits"] == {"train": 32, "valid": 4, "test": 4}
    for split in ("valid", "test"):
        q = np.loadtxt(tmp_path / "a" / f"query_{split}.txt", dtype=np.int64, ndmin=2)
        c = np.loadtxt(tmp_path / "a" / f"candidate_{split}.txt", dtype=np.int64, ndmin=2)
        for a in (0, 1):
            n_q, n_c = (q[:, 1] == a).sum(), (c[:, 1] == a).sum()
            assert n_q == max(1, round((n_q + n_c) / 5)), (split, a, n_q, n_c)
            # within an attribute, an image is a query or a candidate, never both
            assert not set(q[q[:, 1] == a, 0]) & set(c[c[:, 1] == a, 0])


def test_split_is_deterministic_image_disjoint_and_independent_of_row_order(shop, tmp_path):
    quiet = dict(log=lambda s: None)
    dataset_tools.import_catalogue(str(shop / "wide.csv"), str(tmp_path / "a"), seed=3, **quiet)
    dataset_tools.import_catalogue(str(shop / "wide.csv"), str(tmp_path / "b"), seed=3, **quiet)
    with open(shop / "wide.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    write_csv(tmp_path / "shuffled.csv", rows[0], rows[:0:-1])  # the rows reversed
    dataset_tools.import_catalogue(str(tmp_path / "shuffled.csv"), str(tmp_path / "c"), image_root=str(shop), seed=3, **quiet)
    dataset_tools.import_catalogue(str(shop / "wide.csv"), str(tmp_path / "d"), seed=4, **quiet)
    a, b, c, d = (read_folder(tmp_path / x)[0] for x in "abcd")
    assert a == b == c
    assert a["filenames_test.txt"] != d["filenames_test.txt"]  # another seed, another split
    splits = [set(a[f"filenames_{s}.txt"].split("\n")) - {""} for s in ("train", "valid", "test")]
    assert sum(map(len, splits)) == len(set.union(*splits)) == N  # each image in exactly one split


def test_fashionai_label_csv(tmp_path):
    # FashionAI's Annotations/label.csv: no header; 'm' (maybe) is not the value; paths relative to the folder above
    rows = [("skirt_length", "nnynnn", 2), ("skirt_length", "ymnnnn", 0), ("skirt_length", "nmnnny", 5),
            ("skirt_length", "nnynnm", 2), ("collar_design", "nynnn", 1), ("collar_design", "nynnn", 1),
            ("collar_design", "nnnny", 4), ("collar_design", "mnnny", 4)]
    lines, truth = [], {}
    os.makedirs(tmp_path / "Annotations")
    for k in range(5):  # five rounds of the eight rows: 40 images
        for j, (attr, marks, v) in enumerate(rows):
            p = f"Images/{attr}_labels/{k}{j}.jpg"
            os.makedirs(tmp_path / os.path.dirname(p), exist_ok=True)
            Image.new("RGB", (8, 8), (30 * j, 50 * k, 0)).save(tmp_path / p)
            lines.append(f"{p},{attr}_labels,{marks}")
            truth[os.path.normpath(str(tmp_path / p))] = {attr: data.FASHIONAI_VALUE_NAMES[attr][v]}
    lines += ["Images/x.jpg,skirt_length_labels,nnnnnn", "Images/y.jpg,skirt_length_labels,ynnnnnnn"]  # no y; 8 marks
    (tmp_path / "Annotations" / "label.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    s = dataset_tools.import_catalogue(str(tmp_path / "Annotations" / "label.csv"), out, fmt="fashionai", valid_frac=0.2,
                              test_frac=0.2, log=lambda s: None)
    assert s["format"] == "fashionai" and len(s["bad"]) == 2 and not s["missing"]
    meta = data.load_meta("custom", out)
    assert meta["attributes"] == ["skirt_length", "collar_design"]
    assert meta["values"] == [data.FASHIONAI_VALUE_NAMES["skirt_length"], data.FASHIONAI_VALUE_NAMES["collar_design"]]
    assert labels_in_folder(out) == truth
    # the format is recognised without --format too
    again = dataset_tools.import_catalogue(str(tmp_path / "Annotations" / "label.csv"), str(tmp_path / "again"), valid_frac=0.2,
                                  test_frac=0.2, log=lambda s: None)
    assert again["format"] == "fashionai" and read_folder(tmp_path / "again")[0] == read_folder(out)[0]


def test_duplicates_conflicts_and_bad_rows_are_reported(shop, tmp_path):
    with open(shop / "long.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    p0, p1 = rows[1][0], rows[3][0]
    # a repeat (under another spelling of the path), a conflict, a bad row
    extra = [["./" + p0, "colour", "Red"], [p1, "colour", "Green"], ["only two", "fields"]]
    write_csv(tmp_path / "c.csv", rows[0], rows[1:] + extra)
    logs = []
    s = dataset_tools.import_catalogue(str(tmp_path / "c.csv"), str(tmp_path / "out"), image_root=str(shop), log=logs.append)
    assert s["duplicates"] == 1 and len(s["conflicts"]) == 1 and len(s["bad"]) == 1
    assert "Blue" in s["conflicts"][0] and "Green" in s["conflicts"][0]
    found = labels_in_folder(str(tmp_path / "out"))
    assert "colour" not in found[os.path.normpath(os.path.join(shop, p1))]  # a conflicting label is dropped ...
    assert found[os.path.normpath(os.path.join(shop, p0))]["colour"] == "Red"  # ... a repeated one kept once
    assert not any("fewer than 2 training images" in line for line in logs)  # every value has plenty
    # a wide column that is blank in every row is no attribute
    with open(shop / "wide.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    write_csv(tmp_path / "w.csv", rows[0] + ["pattern"], [r + [""] for r in rows[1:]])
    s = dataset_tools.import_catalogue(str(tmp_path / "w.csv"), str(tmp_path / "w"), image_root=str(shop), log=logs.append)
    assert s["attributes"] == ["colour", "length"] and "attributes without a single label (left out): pattern" in logs


def test_cli_exits_with_one_line_when_nothing_usable(shop, tmp_path):
    write_csv(tmp_path / "gone.csv", ["path", "colour"], [["nowhere/a.jpg", "Red"], ["nowhere/b.jpg", "Blue"]])
    r = subprocess.run([sys.executable, os.path.join(REPO, "dataset_tools.py"), "import", str(tmp_path / "gone.csv"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "nothing usable" in r.stderr
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_train_and_evaluate_on_an_imported_catalogue(shop, tmp_path, capsys):
    import evaluate
    import train
    import visualize

    out = str(tmp_path / "shop")
    dataset_tools.import_catalogue(str(shop / "wide.csv"), out, log=lambda s: None)
    train.main(["--data", "custom", "--data-root", out, "--out-dir", str(tmp_path / "run"), "--arch", "tiny", "--img-size", "32",
                "--out-dim", "16", "--batch-size", "8", "--num-triplets", "16", "--epochs", "1", "--workers", "0"])
    with pytest.raises(SystemExit, match="looks like an imported catalogue .* add --data custom"):
        train.main(["--data-root", out, "--epochs", "1"])  # the default --data synthetic on an imported folder
    img = os.path.join(shop, "photos", "summer", "item 07.png")
    result = evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--workers", "0"])
    visualize.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--workers", "0", "--out", str(tmp_path / "fig"),
                    "--retrieve", img, "--attr", "length", "--topk", "2"])
    log = capsys.readouterr().out
    assert 0 <= result["total"] <= 1 and set(result["per_attribute"]) <= {0, 1}
    assert "colour" in log and any(v in log for v in LENGTHS)  # value names in the retrieval table
    assert os.path.isfile(tmp_path / "fig" / "retrieval_item 07_length.png")

"""Fixtures that several test files share, and the repository on sys.path so that the tests import its modules
(cca, data, train, evaluate, ...) whichever folder pytest is started from.

    python -m pytest -q                              # the whole suite, CPU only
    python -m pytest -q tests/test_visualize.py      # one file

The synthetic sets are written once per session and are read-only: a test that changes files copies the set first.
"""
import os
import shutil
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402
import synthetic  # noqa: E402

FASHIONAI_HEADS = os.path.join(REPO, "tests", "fixtures", "fashionai")  # real FashionAI split-file heads (test_data.py)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """The small synthetic set: 60 training images, 10 queries and 40 candidates per split, 32 px, seed 0;
    written in well under a second. Its folder; never written to by a test."""
    root = str(tmp_path_factory.mktemp("synth") / "synthetic")
    synthetic.make_synthetic(root, num_train=60, num_query=10, num_candidate=40, seed=0, size=32, workers=1)
    return root


@pytest.fixture(scope="session")
def synth120(tmp_path_factory):
    """test_train.py's synthetic set: 120 training images, 20 queries and 40 candidates per split, 32 px, seed 0.
    Its tests count steps, queries and missing images of it. Its folder; never written to by a test."""
    root = str(tmp_path_factory.mktemp("synth120") / "synthetic")
    synthetic.make_synthetic(root, num_train=120, num_query=20, num_candidate=40, seed=0, size=32, workers=1)
    return root


@pytest.fixture
def asen_folder():
    """make(root, meta_source="meta.json"): the FashionAI heads as a whole ASEN folder at root (every split file
    present, short or empty; meta.json copied from meta_source), returning root."""
    def make(root, meta_source="meta.json"):
        os.makedirs(root)
        for f in data.ASEN_FILES:
            src = os.path.join(FASHIONAI_HEADS, meta_source if f == "meta.json" else f)
            shutil.copy(src, os.path.join(root, f)) if os.path.isfile(src) else open(os.path.join(root, f), "w").close()
        return root
    return make


@pytest.fixture(scope="module")
def zappos(tmp_path_factory):
    """A folder in CSN's Zappos50K layout: 12 images (paths with spaces, as in UT Zappos50K) and 5 triplets per condition
    and split, CRLF ends. Returns (root, {(split, condition): [(a, far, close), ...]})."""
    root = tmp_path_factory.mktemp("zappos")
    names = [f"Shoes/Boots/Brand {i}/{i}.jpg" for i in range(12)]
    (root / "filenames.json").write_text("".join(n + "\n" for n in names))
    os.makedirs(root / "tripletlists")
    lists = {}
    for split in ("train", "val", "test"):
        for c, cond in enumerate(data.ZAPPOS_CONDITIONS):
            rows = [((3 * k + c) % 12, (3 * k + c + 1) % 12, (3 * k + c + 2) % 12) for k in range(5)]
            lists[split, c] = rows
            (root / "tripletlists" / f"{cond}_tripletlist_{split}.txt").write_bytes(
                "".join(f"{a} {b} {d}\r\n" for a, b, d in rows).encode())
    for i, n in enumerate(names):
        os.makedirs(root / "ut-zap50k-images" / os.path.dirname(n), exist_ok=True)
        Image.new("RGB", (40, 30), (20 * i, 0, 0)).save(root / "ut-zap50k-images" / n)
    return str(root), lists

"""
Data for CCA: the four benchmarks in their real file formats, conditioned triplets for training,
the query/candidate items for evaluation, a built-in synthetic dataset that needs no download, and the shapes set,
another drawn image family with its own 24 classes, that `python compare.py pretrain` pretrains a trunk on.

    python data.py synth --out data/synthetic                  # write the synthetic set (20-40 s on 2 cores)
    python data.py check --data synthetic                      # counts, chance mAP, missing images
    python data.py check --data fashionai --data-root data/fashionai
    python data.py prepare --data fashionai --img-size 224     # decode every image once, into prepared/ arrays
    python data.py import catalogue.csv --out data/shop         # your own labels -> the ASEN format (--data custom)

Formats (ASEN's split files; CSN's Zappos50K lists):
- fashionai, darn, deepfashion (ASEN's split): filenames_{train,valid,test}.txt (one relative image path
  a line), label_train.txt (`fid attr value [attr value ...]`), query_/candidate_{valid,test}.txt
  (`fid attr value`), meta.json (attribute names and value counts). Some files have CRLF line ends.
- zappos (CSN's split): filenames.json (plain text, one path a line, relative to ut-zap50k-images/) and
  tripletlists/{class,closure,gender,heel}_tripletlist_{train,val,test}.txt, lines `anchor far close`.
- synthetic: drawn by this file and written in exactly the ASEN format, so one code path loads both.
- custom: a folder that `data.py import` wrote from a CSV of labels (path,attribute,value rows, or one column per
  attribute; or FashionAI's Annotations/label.csv), in the ASEN format, meta.json with the value names.
"""
import argparse
import colorsys
import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

DATASETS = ("synthetic", "fashionai", "darn", "deepfashion", "zappos", "custom")  # custom: written by data.py import
MEAN = STD = (0.5, 0.5, 0.5)  # the R50+ViT-B/16 weights expect pixels in [-1, 1] (as the ViT paper's pipeline), not ImageNet stats

# the sections of ASEN's combined meta.json
ASEN_SECTIONS = {"fashionai": "FashionAI", "darn": "DARN", "deepfashion": "DeepFashion"}
ASEN_FILES = ["meta.json", "filenames_train.txt", "label_train.txt"] + [
    f"{f}_{s}.txt" for s in ("valid", "test") for f in ("filenames", "query", "candidate")]
ZAPPOS_CONDITIONS = ("class", "closure", "gender", "heel")  # CSN's condition order: index 0..3
ZAPPOS_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # our split name -> CSN's file suffix
ZAPPOS_TRIPLETS = {"train": 200_000, "valid": 80_000, "test": 160_000}  # CSN's README and later work
HINTS = {
    "asen": "the split files and meta.json come from ASEN's repository (github.com/Maryeon/asen, or ASEN++'s "
            "github.com/Maryeon/asenpp); the images from the dataset's own site",
    "zappos": "filenames.json and tripletlists/ come from CSN's repository "
              "(github.com/andreasveit/conditional-similarity-networks); the images are UT Zappos50K's "
              "ut-zap50k-images/",
    "custom": "write the folder from a CSV of labels with: python data.py import CATALOGUE.csv --out DIR",
}

# FashionAI's value names (reference/fashionai_meta_with_value_names.json); ASEN's meta.json has only the counts.
FASHIONAI_VALUE_NAMES = {
    "skirt_length": ["Invisible", "Short Length", "Knee Length", "Midi Length", "Ankle Length", "Floor Length"],
    "sleeve_length": ["Invisible", "Sleeveless", "Cup Sleeves", "Short Sleeves", "Elbow Sleeves", "3/4 Sleeves",
                      "Wrist Length", "Long Sleeves", "Extra Long Sleeves"],
    "coat_length": ["Invisible", "High Waist Length", "Regular Length", "Long Length", "Micro Length", "Knee Length",
                    "Midi Length", "Ankle&Floor Length"],
    "pant_length": ["Invisible", "Short Pant", "Mid Length", "3/4 Length", "Cropped Pant", "Full Length"],
    "collar_design": ["Invisible", "Shirt Collar", "Peter Pan", "Puritan Collar", "Rib Collar"],
    "lapel_design": ["Invisible", "Notched", "Collarless", "Shawl Collar", "Plus Size Shawl"],
    "neckline_design": ["Invisible", "Strapless Neck", "Deep V Neckline", "Straight Neck", "V Neck",
                        "Square Neckline", "Off Shoulder", "Round Neckline", "Sweat Heart Neck",
                        "OneShoulder Neckline"],
    "neck_design": ["Invisible", "Turtle Neck", "Ruffle Semi-High Collar", "Low Turtle Neck", "Draped Collar"],
}

# The attribute names of ASEN's meta.json per dataset: a folder's own meta.json tells which dataset it holds.
ASEN_ATTRIBUTES = {
    "fashionai": list(FASHIONAI_VALUE_NAMES),
    "darn": ["clothes category", "clothes button", "clothes color", "clothes length", "clothes pattern",
             "clothes shape", "collar shape", "sleeve length", "sleeve shape"],
    "deepfashion": ["texture-related", "fabric-related", "shape-related", "part-related", "style-related"],
}
TITLES = {"synthetic": "the synthetic set", "fashionai": "FashionAI", "darn": "DARN", "deepfashion": "DeepFashion",
          "zappos": "UT Zappos50K", "custom": "an imported catalogue"}

# -----------------------------------------------------------------------------
# meta: attribute names and value names, a plain dict (it is saved inside checkpoints)

def load_meta(name, root):
    if name == "zappos":  # CSN's triplet lists carry conditions but no value labels
        return {"name": name, "format": "zappos", "attributes": list(ZAPPOS_CONDITIONS),
                "values": [[] for _ in ZAPPOS_CONDITIONS]}
    path = os.path.join(root, "meta.json")
    with open(path, encoding="utf-8-sig") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if "ATTRIBUTES" not in raw:  # ASEN's combined file: one section per dataset
        section = ASEN_SECTIONS.get(name)
        if section not in raw:
            raise ValueError(f"{path}: neither 'ATTRIBUTES' nor a {section or name!r} section (keys: {sorted(raw)})")
        raw = raw[section]
    try:
        attributes = [str(a) for a in raw["ATTRIBUTES"]]
        nums = raw["ATTRIBUTES_NUM"]
        counts = [int(nums[a]) for a in attributes] if isinstance(nums, dict) else [int(n) for n in nums]
        names = raw.get("ATTRIBUTES_VALUES")
        if names is None and name == "fashionai":
            names = FASHIONAI_VALUE_NAMES
        values = []
        for i, (attr, n) in enumerate(zip(attributes, counts, strict=True)):
            if names is None:  # DARN, DeepFashion: ASEN publishes counts only
                v = [f"value {j}" for j in range(n)]
            else:
                v = [str(x) for x in (names[attr] if isinstance(names, dict) else names[i])]
            if len(v) != n:
                raise ValueError(f"{path}: attribute {attr!r} has {n} values in ATTRIBUTES_NUM, {len(v)} value names")
            values.append(v)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: malformed meta ({type(e).__name__}: {e}); expected ATTRIBUTES, ATTRIBUTES_NUM "
                         f"and optionally ATTRIBUTES_VALUES") from None
    return {"name": name, "format": "asen", "attributes": attributes, "values": values}


def required_files(name, root):
    if name == "zappos":
        lists = [f"tripletlists/{c}_tripletlist_{s}.txt" for s in ZAPPOS_SPLITS.values() for c in ZAPPOS_CONDITIONS]
        return [os.path.join(root, f) for f in ["filenames.json"] + lists]
    return [os.path.join(root, f) for f in ASEN_FILES]


def identify(root):
    """What a folder holds, judged from its own files: ["synthetic"] for a set drawn by this file (its meta.json has
    SYNTHETIC_VERSION, or, before version 2, the synthetic attributes' value names), ["zappos"] for CSN's files, the
    ASEN datasets its meta.json fits (ASEN's combined file fits all three, unless the folder's name says which), or []
    for none of these."""
    if os.path.isfile(os.path.join(root, "filenames.json")) and os.path.isdir(os.path.join(root, "tripletlists")):
        return ["zappos"]
    try:
        with open(os.path.join(root, "meta.json"), encoding="utf-8-sig") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict):
        return []
    if "SYNTHETIC_VERSION" in raw or raw.get("ATTRIBUTES_VALUES") == SYNTH_ATTRIBUTES:
        return ["synthetic"]
    if "IMPORTED_FROM" in raw:  # written by data.py import
        return ["custom"]
    if isinstance(raw.get("ATTRIBUTES"), list):  # one dataset's meta: its attribute names tell which, if known
        found = [n for n, attrs in ASEN_ATTRIBUTES.items() if set(attrs) == {str(a) for a in raw["ATTRIBUTES"]}]
        return found or list(ASEN_SECTIONS)
    found = [n for n, section in ASEN_SECTIONS.items() if section in raw]
    named = [n for n in found if n in os.path.basename(os.path.normpath(root)).lower()]
    return named or found


def looks_like(root, found):
    """'ROOT looks like DARN (ASEN's split files)', for an error message."""
    form = {"zappos": "CSN's triplet lists", "synthetic": "drawn by data.py", "custom": "written by data.py import"}.get(
        found[0] if len(found) == 1 else None, "ASEN's split files")
    return f"{root} looks like {' or '.join(TITLES[n] for n in found)} ({form})"


def check_folder(name, root):
    """Refuse a folder whose own files show that it holds another dataset than --data says, before anything is
    read or written there: above all a real dataset under --data synthetic (the default), which would otherwise be
    taken for a synthetic set to redraw."""
    found = identify(root)
    if name == "synthetic" and found and found != ["synthetic"]:
        raise ValueError(f"{looks_like(root, found)}, not the synthetic set: add " + " or ".join(f"--data {n}" for n in found))
    if name == "synthetic" and not found and os.path.exists(os.path.join(root, "meta.json")):
        raise ValueError(f"{os.path.join(root, 'meta.json')} is not a synthetic set's meta.json (no SYNTHETIC_VERSION): "
                         f"give --data the dataset it belongs to, or another --data-root")
    return found


def prepare_dataset(name, root=None):
    """Resolve root (default data/NAME); create the synthetic set when missing; else fail naming what is missing."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    root = root or os.path.join("data", name)
    found = check_folder(name, root)
    if name == "synthetic" and not os.path.exists(os.path.join(root, "meta.json")):
        # meta.json is written last, so its absence means "missing or unfinished". Build in a private folder and
        # rename it into place: several processes (torchrun) may race here, and a rename is all-or-nothing.
        print(f"creating the synthetic dataset in {root} (once; under a minute)")
        tmp = f"{os.path.normpath(root)}.tmp{os.getpid()}"
        make_synthetic(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first, or root is a non-empty folder of something else
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(os.path.join(root, "meta.json")):
                raise FileNotFoundError(f"{root} exists but holds no finished synthetic set (no meta.json): "
                                        f"remove it or choose another --data-root") from None
    for path in required_files(name, root):
        if not os.path.isfile(path):
            hint = "" if name == "synthetic" else "; " + HINTS.get(name, HINTS["asen"])
            if found and name not in found:
                hint = f"; {looks_like(root, found)}: add " + " or ".join(f"--data {n}" for n in found)
            raise FileNotFoundError(f"{name}: missing {path}{hint}")
    if name == "synthetic":
        with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
            version = json.load(f).get("SYNTHETIC_VERSION", 1)
        if version != SYNTH_VERSION:
            raise ValueError(f"{root} holds a synthetic set drawn by an older data.py (version {version}, this one draws "
                             f"version {SYNTH_VERSION}): delete the folder to draw it anew, or give another --data-root")
    return root, load_meta(name, root)

# -----------------------------------------------------------------------------
# split-file readers; whitespace split() per line makes CRLF ends and tabs harmless

def _lines(path):
    """(lineno, line, fields) of each non-blank line of a text file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                yield lineno, line.rstrip("\r\n"), fields


def _fail(errors, msg):
    """Raise at the first bad line, or, when a list is given (data.py check), collect them all."""
    if errors is None:
        raise ValueError(msg)
    errors.append(msg)


def read_filenames(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_labels(path, num_images, meta, multi=False, errors=None):
    """(P, 3) int64 rows (fid, attr, value): one per pair of a label_train line (multi), or per query/candidate
    line. Every line is checked against the filenames count and the meta; errors name the file and line."""
    counts = [len(v) for v in meta["values"]]
    form = "fid attr value [attr value ...]" if multi else "fid attr value"
    rows = []
    for lineno, line, fields in _lines(path):
        where = f"{path}:{lineno}"
        try:
            nums = [int(x) for x in fields]
        except ValueError:
            nums = []
        if len(nums) < 3 or len(nums) % 2 == 0 or (not multi and len(nums) != 3):
            _fail(errors, f"{where}: expected '{form}', got {line!r}")
            continue
        fid, pairs = nums[0], list(zip(nums[1::2], nums[2::2]))
        if not 0 <= fid < num_images:
            _fail(errors, f"{where}: fid {fid} out of range: the filenames file has {num_images} lines")
            continue
        bad = [(a, v) for a, v in pairs if not (0 <= a < len(counts) and 0 <= v < counts[a])]
        if bad:
            a, v = bad[0]
            msg = (f"attribute {a} out of range: meta.json has {len(counts)} attributes" if not 0 <= a < len(counts)
                   else f"value {v} out of range: attribute {a} ({meta['attributes'][a]}) has {counts[a]} values")
            _fail(errors, f"{where}: {msg}")
            continue
        rows += [(fid, a, v) for a, v in pairs]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def read_zappos_triplets(root, split, num_triplets, num_images, errors=None):
    """(T, 4) int64 rows (anchor, far, close, condition) of CSN's lists. num_triplets counts all four conditions:
    the first ceil-share of each condition's file. (CSN shuffles the concatenation and keeps the first n, which is
    also about n/4 per condition; the first lines of each file keep ours deterministic.) None reads every line."""
    rows = []
    for c, cond in enumerate(ZAPPOS_CONDITIONS):
        path = os.path.join(root, "tripletlists", f"{cond}_tripletlist_{ZAPPOS_SPLITS[split]}.txt")
        share = None if num_triplets is None else num_triplets // 4 + (c < num_triplets % 4)
        n = 0
        for lineno, line, fields in _lines(path):
            if share is not None and n == share:
                break
            try:
                a, far, close = (int(x) for x in fields)
            except ValueError:
                _fail(errors, f"{path}:{lineno}: expected 'anchor far close', got {line!r}")
                continue
            if not all(0 <= i < num_images for i in (a, far, close)):
                _fail(errors, f"{path}:{lineno}: image index out of range: filenames.json has {num_images} lines")
                continue
            rows.append((a, far, close, c))
            n += 1
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def zappos_paths(root):
    return [os.path.join(root, "ut-zap50k-images", p) for p in read_filenames(os.path.join(root, "filenames.json"))]


def read_items(name, root, split, role, errors=None):
    """Root-joined image paths and (fid, attr, value) rows of an ASEN query or candidate list."""
    if split not in ("valid", "test") or role not in ("query", "candidate"):
        raise ValueError(f"split must be valid|test and role query|candidate, got {split!r}, {role!r}")
    meta = load_meta(name, root)
    names = read_filenames(os.path.join(root, f"filenames_{split}.txt"))
    rows = read_labels(os.path.join(root, f"{role}_{split}.txt"), len(names), meta, errors=errors)
    return [os.path.join(root, names[f]) for f in rows[:, 0]], rows

# -----------------------------------------------------------------------------
# images

def read_image(path, img_size):
    """(3, S, S) uint8: resize the short side to S, centre-crop (ASEN). The decoding half of load_image."""
    try:
        with Image.open(path) as im:
            # a JPEG decodes at 1/2, 1/4 or 1/8 scale while it stays >= S: several times faster on large photos
            im.draft("RGB", (img_size, img_size))
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as e:  # truncated, not an image, decompression bomb: say which file
        raise OSError(f"cannot read image {path}: {e}") from e
    w, h = im.size
    if min(w, h) != img_size:  # torchvision Resize(int): short side = S, long side truncated
        w, h = (img_size, int(img_size * h / w)) if w <= h else (int(img_size * w / h), img_size)
        im = im.resize((w, h), Image.BILINEAR)
    left, top = int(round((w - img_size) / 2)), int(round((h - img_size) / 2))  # torchvision CenterCrop
    im = im.crop((left, top, left + img_size, top + img_size))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def normalise(x, flip=False):
    """uint8 (..., 3, S, S) -> float32 in [-1, 1]; flip=True mirrors it left-right."""
    if flip:
        x = x.flip(-1)
    return (x.float().div_(255) - MEAN[0]) / STD[0]


def load_image(path, img_size, flip=False):
    """(3, S, S) float32 in [-1, 1]: resize the short side to S, centre-crop (ASEN); flip=True mirrors it."""
    return normalise(read_image(path, img_size), flip)


def error_message(e):
    """An error's message for the one `error: ...` line of a command. An exception raised in a DataLoader worker
    comes back re-raised by torch as "Caught OSError in DataLoader worker process 0." and the worker's traceback,
    whose last line holds the original message (the one that names the file): that message, without its type."""
    lines = str(e).strip().splitlines()
    if lines and lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(e)


def missing_images(paths):
    """The paths that are not files (DARN's images are partly gone from the web)."""
    return [p for p in paths if not os.path.isfile(p)]


def missing_message(missing, total, what):
    return (f"{len(missing)} of {total} {what} images are missing, e.g. {missing[:5]}; "
            f"'python data.py check' lists them all")

# -----------------------------------------------------------------------------
# training: conditioned triplets

class TripletDataset(torch.utils.data.Dataset):
    """(anchor, positive, negative, condition). ASEN data: a fresh draw of num_triplets each epoch (ASEN++'s rule);
    zappos: CSN's fixed list, reshuffled each epoch. Under torchrun each rank keeps every world_size-th triplet.
    cache=True decodes every training image once, up front, into memory (uint8, 3 * S * S bytes each: 18 MB for
    the synthetic set at 32 px, 15 GB for 100,000 images at 224 px); a step then costs no decoding at all.
    Prepared arrays at img_size (`data.py prepare`), when there are, are used instead of both (prepared=False: not)."""

    def __init__(self, name, root, img_size, num_triplets, seed=0, rank=0, world_size=1, flip=True, cache=False,
                 prepared=True):
        self.meta = load_meta(name, root)
        self.img_size, self.num_triplets, self.flip = img_size, num_triplets, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if self.meta["format"] == "zappos":
            self.paths = zappos_paths(root)
            t = read_zappos_triplets(root, "train", num_triplets, len(self.paths))
            gone = self._missing(np.unique(t[:, :3]))
            t = t[~np.isin(t[:, :3], gone).any(1)]  # a triplet with a missing image is left out
            self.fixed = t[:, [0, 2, 1, 3]]  # CSN's (anchor, far, close): close is the positive, far the negative
        else:
            names = read_filenames(os.path.join(root, "filenames_train.txt"))
            self.paths = [os.path.join(root, n) for n in names]
            labels = read_labels(os.path.join(root, "label_train.txt"), len(names), self.meta, multi=True)
            gone = self._missing(np.unique(labels[:, 0]))
            self._index(labels[~np.isin(labels[:, 0], gone)])  # missing images never enter a triplet
        self.images = None
        used = np.unique(self.fixed[:, :3]) if self.meta["format"] == "zappos" else np.unique(self.members)
        self.prepared = open_prepared(name, root, "train", img_size) if prepared else None
        if self.prepared is not None:  # memory-mapped: nothing to decode, nothing held per process
            self.prepared.check(used, [self.paths[f] for f in used])
        elif cache:
            self._cache(used)
        self.set_epoch(0)  # usable without set_epoch

    def _cache(self, fids):
        t0, n = time.time(), len(fids)
        self.slot = np.full(len(self.paths), -1)  # image id -> row of self.images
        self.slot[fids] = np.arange(n)
        self.images = torch.empty(n, 3, self.img_size, self.img_size, dtype=torch.uint8)
        for row, f in enumerate(fids):
            self.images[row] = read_image(self.paths[f], self.img_size)
            if (row + 1) % 20_000 == 0:
                print(f"caching training images: {row + 1}/{n} ({time.time() - t0:.0f} s)", flush=True)
        print(f"cached {n} training images at {self.img_size} px in memory "
              f"({self.images.numel() / 2**20:.0f} MiB, {time.time() - t0:.1f} s)", flush=True)

    def _missing(self, fids):
        """Check the training images once, up front: report the missing ones and train without them,
        rather than crash in a loader worker hours into a run."""
        missing = missing_images([self.paths[f] for f in fids])
        if len(missing) == len(fids):
            raise FileNotFoundError(missing_message(missing, len(fids), "training"))
        if missing:
            print(f"warning: {missing_message(missing, len(fids), 'training')}; training without them", flush=True)
        gone = set(missing)
        return np.array([f for f in fids if self.paths[f] in gone], dtype=np.int64)

    def _index(self, labels):
        # Group image ids by global value id g = offset[attr] + value, so that "an image of value g" is one lookup
        # into a flat array: members[start[g] + k], k < count[g]. This is what lets a whole epoch draw vectorised.
        labels = np.unique(labels, axis=0)  # a pair listed twice must not pair an image with itself
        nvals = np.array([len(v) for v in self.meta["values"]])
        offset = np.concatenate([[0], np.cumsum(nvals)[:-1]])
        gid = offset[labels[:, 1]] + labels[:, 2]
        self.num_values = G = int(nvals.sum())
        self.members = labels[np.lexsort((labels[:, 0], gid)), 0]
        self.count = np.bincount(gid, minlength=G)
        self.start = np.cumsum(self.count) - self.count
        # the image's (fid, value) keys, to refuse a negative that also has the first value (DeepFashion labels
        # several values of one attribute type per image)
        self.keys = np.unique(labels[:, 0] * G + gid)
        # An attribute can give a triplet when one value has >= 2 images (anchor, positive) and another has >= 1.
        pos, nonempty, eligible = [], [], []
        for a in range(len(nvals)):
            g = np.arange(offset[a], offset[a] + nvals[a])
            if (self.count[g] >= 2).any() and (self.count[g] >= 1).sum() >= 2:
                eligible.append(a)
                pos.append(g[self.count[g] >= 2])
                nonempty.append(g[self.count[g] >= 1])
        if not eligible:
            raise ValueError("label_train.txt: no attribute has a value with 2 images and another value with 1: "
                             "no triplet can be drawn")
        # ragged lists -> padded (E, width) tables of value ids plus lengths, indexable by a whole array at once
        width = max(len(g) for g in nonempty)
        self.eligible = np.array(eligible)
        self.pos = np.stack([np.pad(g, (0, width - len(g))) for g in pos])
        self.npos = np.array([len(g) for g in pos])
        self.nonempty = np.stack([np.pad(g, (0, width - len(g))) for g in nonempty])
        self.nne = np.array([len(g) for g in nonempty])
        self.rank_in_nonempty = np.zeros(G, dtype=np.int64)  # where value g sits in its attribute's nonempty list
        for g in nonempty:
            self.rank_in_nonempty[g] = np.arange(len(g))

    def _draw(self, rng, n):
        """Exactly n triplets (anchor, positive, negative, attribute): _draw_some's, topped up by fresh draws for the
        triplets it left out, so that an epoch holds the number of triplets asked for."""
        parts, have, barren = [], 0, 0
        while have < n:
            t = self._draw_some(rng, n - have)
            parts.append(t)
            have += len(t)
            barren = 0 if len(t) else barren + 1
            if barren == 100:  # no label set of a real dataset comes near: every negative shares the first value
                raise ValueError("label_train.txt: the negatives drawn keep sharing the anchor's value (an image labelled "
                                 "with every value of an attribute?): no triplet can be completed")
        return np.concatenate(parts)

    def _draw_some(self, rng, n):
        """Up to n triplets by ASEN's rule, each step one array op; those whose negative still has the first value
        after 10 redraws are left out."""
        k = rng.integers(len(self.eligible), size=n)  # attribute uniform over the attributes that can give one
        v1 = self.pos[k, rng.integers(0, self.npos[k])]  # first value uniform among those with >= 2 images
        ia = rng.integers(0, self.count[v1])
        ip = rng.integers(0, self.count[v1] - 1)
        ip += ip >= ia  # a second, different image of the same value
        anchor, positive = self.members[self.start[v1] + ia], self.members[self.start[v1] + ip]

        def draw_negative(rows):
            j = rng.integers(0, self.nne[k[rows]] - 1)
            j += j >= self.rank_in_nonempty[v1[rows]]  # second value uniform among the *other* nonempty values
            v2 = self.nonempty[k[rows], j]
            return self.members[self.start[v2] + rng.integers(0, self.count[v2])]

        negative = draw_negative(np.arange(n))
        for _ in range(10):  # bounded: a negative that also has the first value is redrawn, at most 10 times
            q = negative * self.num_values + v1
            bad = np.flatnonzero(self.keys[np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)] == q)
            if len(bad) == 0:
                break
            negative[bad] = draw_negative(bad)
        else:  # still sharing the first value after 10 redraws: leave those triplets out
            keep = np.ones(n, dtype=bool)
            keep[bad] = False
            anchor, positive, negative, k = anchor[keep], positive[keep], negative[keep], k[keep]
        return np.stack([anchor, positive, negative, self.eligible[k]], 1)

    def set_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])  # same (seed, epoch) -> same triplets on every rank
        if self.meta["format"] == "zappos":
            full = self.fixed[rng.permutation(len(self.fixed))]
        else:
            full = self._draw(rng, self.num_triplets)
        # Every rank draws the whole set and keeps its strided share; wrapping pads the set to a multiple of
        # world_size, because DDP hangs when one rank takes a step more than the others.
        per_rank = -(-len(full) // self.world_size)
        full = np.resize(full, (per_rank * self.world_size, 4))
        self.triplets = full[self.rank::self.world_size]  # (n, 4) int64: anchor, positive, negative, condition

    def __len__(self):
        return len(self.triplets)

    def _gather(self, fids):
        """uint8 (len(fids), 3, S, S) from the prepared array or the in-memory cache."""
        if self.prepared is not None:
            return self.prepared.take(fids)
        return self.images[torch.from_numpy(self.slot[fids])]

    def raw_batch(self, rows, flips=None):
        """Triplets `rows` (an index array) as uint8 (B, 3, S, S) anchors, positives, negatives and (B,) conditions,
        straight from the prepared arrays or the in-memory cache in a few tensor ops: the training loop's path for
        both. uint8 is a quarter of float32's bytes to move; train.py normalises on the device.
        flips (B, 3) bool, default random (torch's generator) when flip=True."""
        if self.images is None and self.prepared is None:
            raise RuntimeError("TripletDataset.batch needs cache=True or prepared arrays")
        t = self.triplets[rows]  # (B, 4)
        if flips is None:
            flips = torch.rand(len(t), 3) < 0.5 if self.flip else torch.zeros(len(t), 3, dtype=torch.bool)
        x = [self._gather(t[:, j]) for j in range(3)]  # 3 x (B, 3, S, S) uint8, fresh copies
        for k, j in flips.nonzero().tolist():  # mirrored in place, one image at a time: several times faster at
            x[j][k] = x[j][k].flip(-1)         # 224 px than a where() over the batch, which flips every image
        return x[0], x[1], x[2], torch.from_numpy(t[:, 3].copy())

    def batch(self, rows, flips=None):
        """raw_batch, normalised: float32 in [-1, 1]."""
        a, p, n, c = self.raw_batch(rows, flips)
        return normalise(a), normalise(p), normalise(n), c

    def __getitem__(self, i):
        a, p, n, c = self.triplets[i].tolist()
        flips = (torch.rand(3) < 0.5).tolist() if self.flip else [False] * 3  # DataLoader seeds torch per worker
        stored = self.images is not None or self.prepared is not None
        raw = (self._gather(np.array([j]))[0] if stored else read_image(self.paths[j], self.img_size) for j in (a, p, n))
        images = [normalise(x, f) for x, f in zip(raw, flips)]
        return images[0], images[1], images[2], c

class TripletBatches(torch.utils.data.Dataset):
    """An epoch of a TripletDataset with stored images (prepared or cached) as whole batches: item i is raw_batch of
    triplets i*B .. (i+1)*B-1, so that DataLoader(batch_size=None) workers build uint8 batches with fresh flips."""

    def __init__(self, triplets, batch_size):
        self.triplets, self.batch_size = triplets, batch_size

    def __len__(self):
        return len(self.triplets) // self.batch_size

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.triplets.raw_batch(np.arange(i * self.batch_size, (i + 1) * self.batch_size))

# -----------------------------------------------------------------------------
# evaluation sets

# What evaluation does with a listed image that is not there (--eval-missing): "error" refuses the split, because an
# item left out changes the metric; "drop" scores without it, and the result says it is not comparable with published
# numbers (DARN's images are partly gone from the web: it can only be scored so).
EVAL_MISSING = ("error", "drop")
DROP_HINT = "; --eval-missing drop scores without them (not comparable with published numbers)"


def check_eval_images(name, root, missing="error", splits=("valid", "test")):
    """Look for every image of the evaluation splits, as train.py does before its first step (a missing one would
    otherwise stop a run at its first validation, an epoch in). Raises under missing="error"; returns what "drop"
    leaves out: {split: {"query"/"candidate" (zappos: "triplets"): (left out, listed)}}."""
    out = {}
    for split in splits:
        if name == "zappos":
            z = ZapposEvalSet(root, split, 0, missing=missing, prepared=False)
            out[split] = {"triplets": (z.left_out, z.listed)}
        else:
            out[split] = {}
            for role in ("query", "candidate"):
                items = EvalItems(name, root, split, role, 0, missing, prepared=False)
                out[split][role] = (items.left_out, items.listed)
    return out


class EvalItems(torch.utils.data.Dataset):
    """The query or candidate items of an ASEN split: (image, attribute, value, index). missing (EVAL_MISSING):
    "drop" leaves out the items whose image is missing; self.left_out of self.listed were.
    Prepared arrays at img_size (`data.py prepare`) are read when there are (prepared=False: not)."""

    def __init__(self, name, root, split, role, img_size, missing="error", prepared=True):
        self.img_size = img_size
        self.paths, rows = read_items(name, root, split, role)
        self.listed, gone = len(self.paths), missing_images(self.paths)
        if gone and (missing != "drop" or len(gone) == self.listed):
            raise FileNotFoundError(missing_message(gone, self.listed, f"{split} {role}") + (DROP_HINT if missing != "drop" else ""))
        if gone:
            gone = set(gone)
            keep = np.array([p not in gone for p in self.paths])
            self.paths, rows = [p for p, k in zip(self.paths, keep) if k], rows[keep]
        self.left_out = self.listed - len(self.paths)
        self.fids = rows[:, 0].copy()  # rows of the split's prepared array
        self.prepared = open_prepared(name, root, split, img_size) if prepared else None
        if self.prepared is not None:  # after the missing check: the images it is given are there now
            self.prepared.check(self.fids, self.paths)
        self.attrs, self.values = torch.from_numpy(rows[:, 1].copy()), torch.from_numpy(rows[:, 2].copy())

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = normalise(self.prepared.take([self.fids[i]])[0]) if self.prepared else load_image(self.paths[i], self.img_size)
        return image, int(self.attrs[i]), int(self.values[i]), i


class ZapposEvalSet(torch.utils.data.Dataset):
    """A zappos val/test list as unique (image, condition) items, each embedded once; triplets index the items."""

    def __init__(self, root, split, img_size, num_triplets=None, missing="error", prepared=True):
        self.img_size = img_size
        paths = zappos_paths(root)
        t = read_zappos_triplets(root, split, num_triplets or ZAPPOS_TRIPLETS[split], len(paths))  # (T, 4)
        fids = np.unique(t[:, :3])
        gone = missing_images([paths[f] for f in fids])
        self.listed = len(t)
        if gone and missing == "drop":  # leave out the triplets that use a missing image
            gone_set = set(gone)
            t = t[~np.isin(t[:, :3], [f for f in fids if paths[f] in gone_set]).any(1)]
        if gone and (missing != "drop" or len(t) == 0):
            raise FileNotFoundError(missing_message(gone, len(fids), f"zappos {split}") + (DROP_HINT if missing != "drop" else ""))
        self.left_out = self.listed - len(t)
        pairs = np.stack([t[:, :3].reshape(-1), np.repeat(t[:, 3], 3)], 1)  # (3T, 2): image, condition
        items, inverse = np.unique(pairs, axis=0, return_inverse=True)
        self.paths = [paths[f] for f in items[:, 0]]
        self.fids = items[:, 0].copy()  # rows of zappos's prepared array
        self.prepared = open_prepared("zappos", root, split, img_size) if prepared else None
        if self.prepared is not None:
            self.prepared.check(self.fids, self.paths)
        self.item_conditions = torch.from_numpy(items[:, 1].copy())
        self.triplets = torch.from_numpy(inverse.reshape(-1, 3))  # (T, 3) item indices: anchor, far, close
        self.conditions = torch.from_numpy(t[:, 3].copy())  # (T,)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = normalise(self.prepared.take([self.fids[i]])[0]) if self.prepared else load_image(self.paths[i], self.img_size)
        return image, int(self.item_conditions[i]), i


def chance_ap(queries, candidates):
    """Expected AP of a random ranking per query (rows (fid, attr, value)). With N candidates of the query's
    attribute and R relevant, E[AP] = ((R-1)/(N-1) * (N - H_N) + H_N) / N, H_N the N-th harmonic number;
    about R/N. A query with R = 0 has AP 0, as in ASEN's evaluation."""
    ap = np.zeros(len(queries))
    for i, (_, a, v) in enumerate(queries):
        same_attr = candidates[:, 1] == a
        N, R = int(same_attr.sum()), int((same_attr & (candidates[:, 2] == v)).sum())
        if R > 0:
            H = float(np.sum(1.0 / np.arange(1, N + 1)))
            ap[i] = ((R - 1) / max(N - 1, 1) * (N - H) + H) / N
    return ap


def chance_map(name, root, split, missing="error"):
    """The split's chance level: query-weighted mAP of a random ranking on an ASEN split (about 0.155
    for FashionAI); for zappos, scored by triplet accuracy, a coin flip: 0.5. missing="drop": the level
    of the items whose images are there, those --eval-missing drop scores."""
    if name == "zappos":
        return 0.5
    rows = []
    for role in ("query", "candidate"):
        paths, r = read_items(name, root, split, role)
        rows.append(r[np.array([os.path.isfile(p) for p in paths], dtype=bool)] if missing == "drop" else r)
    return float(chance_ap(*rows).mean())

# -----------------------------------------------------------------------------
# the synthetic dataset: garment-like figures with 5 independent attributes

SYNTH_ATTRIBUTES = {
    "sleeve_length": ["Sleeveless", "Short Sleeves", "Elbow Sleeves", "Long Sleeves"],  # a region: the arms
    "length": ["Cropped", "Hip Length", "Knee Length", "Ankle Length"],  # a region: where the hem ends
    "neckline": ["Round Neck", "V Neck", "Square Neck", "Turtle Neck"],  # a region: the top centre
    "colour": ["Red", "Yellow", "Green", "Cyan", "Blue", "Magenta"],  # global
    "pattern": ["Plain", "Stripes", "Dots", "Checks"],  # global
}
# Written into meta.json; raised whenever the drawing changes, so that a set drawn by an older data.py is refused
# rather than silently trained on (what changed in each version: docs/LOG.md).
SYNTH_VERSION = 2
# Geometry in units of a 64-px frame. Every value differs from its neighbours by a large area of pixels, not by a
# detail: a small network trained from scratch for minutes must see them (tuned with a proxy of the demo model).
SLEEVE = [0, 8, 15, 24]  # sleeve length from the armhole
HEM = [18, 26, 35, 45]  # hem height below the shoulder line
HUE = [0, 60, 120, 180, 240, 300]  # degrees: as far apart as six hues can be
# Nuisances: enough that no attribute can be read off a fixed pixel, little enough to learn in minutes.
SCALE_JITTER = 0.08  # garment size x U(1 - j, 1 + j)
SHIFT_JITTER = 2.0  # garment position, units
BACKGROUND = (0.4, 0.85)  # grey level range of the background
NOISE_STD = 4.0  # pixel noise, of 255


def on_background(figure, mask, rng, size):
    """The (W, W) `figure` pasted through `mask` onto a random background (a low-saturation tone with a gentle
    gradient, drawn small and stretched: it is linear), downsampled to `size` with LANCZOS, plus pixel noise."""
    W = figure.size[0]
    g = rng.uniform(*BACKGROUND) + rng.uniform(-0.03, 0.03, size=3)
    gx, gy = rng.uniform(-0.08, 0.08, size=2)
    ramp = np.linspace(-0.5, 0.5, 8)
    bg = g + gx * ramp[None, :, None] + gy * ramp[:, None, None]  # (8, 8, 3)
    bg = Image.fromarray((bg.clip(0, 1) * 255).round().astype(np.uint8)).resize((W, W), Image.BILINEAR)
    img = Image.composite(figure, bg, mask).resize((size, size), Image.LANCZOS)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, NOISE_STD, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(noisy.clip(0, 255).round().astype(np.uint8))


def draw_garment(values, rng, size=64, zoom=4):
    """One figure as a PIL image, drawn zoom times larger and downsampled with LANCZOS for anti-aliasing.
    values: one index per SYNTH_ATTRIBUTES entry."""
    sleeve, length, neck, colour, pattern = values
    W = size * zoom
    s = rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    cx, top = 32 + rng.uniform(-SHIFT_JITTER, SHIFT_JITTER), 10.5 + rng.uniform(-SHIFT_JITTER, SHIFT_JITTER)
    P = lambda x, y: ((cx + x * s) * W / 64, (top + y * s) * W / 64)  # design units -> canvas pixels

    mask = Image.new("L", (W, W), 0)
    d = ImageDraw.Draw(mask)
    hem = HEM[length]
    flare = 11 + 0.08 * hem  # a slight A-line so the long garments look like dresses
    d.polygon([P(-11, 0), P(11, 0), P(flare, hem), P(-flare, hem)], fill=255)
    if SLEEVE[sleeve] > 0:
        sn, cs = np.sin(np.radians(28)), np.cos(np.radians(28))  # sleeves hang 28 degrees out from vertical
        for side in (-1, 1):
            ax, ay, L, h = side * 9.5, 4.5, SLEEVE[sleeve] + 1.5, 4.5  # sleeve axis from the armhole, half width h
            dx, dy, px, py = side * sn, cs, side * cs, -sn  # along the sleeve, across it
            d.polygon([P(ax + px * h, ay + py * h), P(ax + dx * L + px * h, ay + dy * L + py * h),
                       P(ax + dx * L - px * h, ay + dy * L - py * h), P(ax - px * h, ay - py * h)], fill=255)
    # necklines differ in width and depth as well as in shape, each by a large area at 32 px
    if neck == 0:  # round: a small half disc cut from the top edge
        d.ellipse([P(-5, -5), P(5, 5)], fill=0)
    elif neck == 1:  # V: wide and very deep
        d.polygon([P(-9, -1), P(9, -1), P(0, 16)], fill=0)
    elif neck == 2:  # square: wide, almost to the shoulders, and deep
        d.rectangle([P(-10, -1), P(10, 12)], fill=0)
    else:  # turtle: no opening, a tall collar standing well above the shoulders
        d.rectangle([P(-6.5, -10), P(6.5, 0.5)], fill=255)

    # pattern, in units relative to the garment so it moves and scales with it, with a random phase; coarse, so
    # that it shows at 64 px. Broadcasting a row of u against a column of v keeps this to one (W, W) array.
    axis = np.arange(W, dtype=np.float32) * (64 / W)
    u = ((axis - cx) / s + rng.uniform(0, 8))[None, :]  # (1, W)
    v = ((axis - top) / s + rng.uniform(0, 8))[:, None]  # (W, 1)
    if pattern == 1:  # vertical stripes, 4 units thick (horizontal ones would line up with the hem and sleeve ends)
        on = np.broadcast_to((u % 8) < 4, (W, W))
    elif pattern == 2:  # dots on a staggered 8-unit grid
        du, dv = (u + 4 * (np.floor(v / 8) % 2)) % 8 - 4, v % 8 - 4
        on = du * du + dv * dv < 2.0 ** 2
    elif pattern == 3:  # checks of 8-unit squares
        on = (np.floor(u / 8) + np.floor(v / 8)) % 2 == 0
    else:
        on = np.zeros((W, W), dtype=bool)
    hue = (HUE[colour] + rng.uniform(-6, 6)) / 360 % 1
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 0.9), rng.uniform(0.75, 0.95))
    garment = Image.new("RGB", (W, W), tuple(round(255 * c) for c in rgb))
    # the pattern in a dark shade of the same hue, so the colour stays readable
    garment.paste(tuple(round(255 * 0.3 * c) for c in rgb), mask=Image.fromarray(on.astype(np.uint8) * 255))

    return on_background(garment, mask, rng, size)


def _synth_one(job):
    path, values, seed, split_id, index, size = job
    rng = np.random.default_rng([seed, split_id, index])  # per image: the same pixels with any number of workers
    draw_garment(values, rng, size).save(path, quality=90)


def make_synthetic(out, num_train=6000, num_query=400, num_candidate=1600, seed=0, size=64, workers=2):
    """Write the synthetic set in the ASEN format: images/, filenames_*, label_train, query_/candidate_{valid,test},
    meta.json (last, so its presence marks a finished set). Deterministic in seed."""
    t0 = time.time()
    rng = np.random.default_rng(seed)  # labels and splits; the pixels come from per-image generators
    attrs, nvals = list(SYNTH_ATTRIBUTES), [len(v) for v in SYNTH_ATTRIBUTES.values()]
    jobs = []
    for split_id, (split, n) in enumerate([("train", num_train), ("valid", num_query + num_candidate),
                                           ("test", num_query + num_candidate)]):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        values = np.stack([rng.integers(k, size=n) for k in nvals], 1)  # (n, A): independent, uniform
        names = [f"images/{split}/{i:05d}.jpg" for i in range(n)]
        jobs += [(os.path.join(out, f), tuple(int(x) for x in values[i]), seed, split_id, i, size)
                 for i, f in enumerate(names)]
        with open(os.path.join(out, f"filenames_{split}.txt"), "w") as f:
            f.writelines(p + "\n" for p in names)
        if split == "train":  # every attribute of every image
            with open(os.path.join(out, "label_train.txt"), "w") as f:
                f.writelines(f"{i} " + " ".join(f"{a} {v}" for a, v in enumerate(values[i])) + "\n" for i in range(n))
            continue
        # Evaluation: each image listed once, under one attribute; attributes dealt round-robin over a shuffled
        # order, so every attribute has the same share of queries and of candidates.
        order = rng.permutation(n)
        for role, ks in (("query", range(num_query)), ("candidate", range(num_query, n))):
            rows = sorted((int(order[k]), k % len(attrs)) for k in ks)
            with open(os.path.join(out, f"{role}_{split}.txt"), "w") as f:
                f.writelines(f"{i} {a} {values[i, a]}\n" for i, a in rows)
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            for _ in pool.imap_unordered(_synth_one, jobs, chunksize=64):
                pass
    else:
        for job in jobs:
            _synth_one(job)
    meta = {"ATTRIBUTES": attrs, "ATTRIBUTES_NUM": dict(zip(attrs, nvals)), "ATTRIBUTES_VALUES": SYNTH_ATTRIBUTES,
            "SYNTHETIC_VERSION": SYNTH_VERSION}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"synthetic: {len(jobs)} images of {size}x{size} px in {out} ({time.time() - t0:.1f} s)")

# -----------------------------------------------------------------------------
# the shapes set: another image family with its own classes, to pretrain a trunk on (compare.py pretrain)

# Single geometric figures, one class per (shape, fill): none is a garment and no class is one of the synthetic
# set's attributes (colour is random here and no class depends on it). Drawn like the garments (zoomed canvas,
# LANCZOS down, a grey gradient background, pixel noise), so that a trunk pretrained on them has seen images of
# the same statistics, as an ImageNet trunk has seen photographs.
SHAPES = ("disc", "triangle", "square", "star", "cross", "crescent", "half disc", "bar")
FILLS = ("solid", "outline", "hatched")
SHAPE_CLASSES = [f"{fill} {shape}" for shape in SHAPES for fill in FILLS]  # class k = (SHAPES[k // 3], FILLS[k % 3])


def shape_outline(shape, cx, cy, r, turn):
    """The figure as a polygon: (x, y) points of a shape of radius r about (cx, cy), rotated by `turn` radians."""
    if shape == "disc":
        pts = [(np.cos(t), np.sin(t)) for t in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    elif shape == "triangle":
        pts = [(np.cos(t), np.sin(t)) for t in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "star":  # five points, inner radius 0.45
        pts = [((1 if i % 2 == 0 else 0.45) * np.cos(t), (1 if i % 2 == 0 else 0.45) * np.sin(t))
               for i, t in enumerate(np.pi / 2 + np.arange(10) * np.pi / 5)]
    elif shape == "cross":  # a plus sign with arms 0.6 wide
        a, b = 1.0, 0.3
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    elif shape == "crescent":  # the unit circle less a circle shifted right: outer arc, then inner arc back
        outer = [(np.cos(t), np.sin(t)) for t in np.linspace(0.35 * np.pi, 1.65 * np.pi, 32)]
        inner = [(0.55 + 0.8 * np.cos(t), 0.8 * np.sin(t)) for t in np.linspace(1.55 * np.pi, 0.45 * np.pi, 24)]
        pts = outer + inner
    elif shape == "half disc":
        pts = [(np.cos(t), np.sin(t) + 0.4) for t in np.linspace(np.pi, 2 * np.pi, 32)]
    else:  # bar: a long thin rectangle
        pts = [(-1, -0.25), (1, -0.25), (1, 0.25), (-1, 0.25)]
    c, s = np.cos(turn), np.sin(turn)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(label, rng, size=64, zoom=4):
    """One figure of class `label` (an index of SHAPE_CLASSES) as a PIL image: random colour, size, place, turn."""
    shape, fill = SHAPES[label // len(FILLS)], FILLS[label % len(FILLS)]
    W = size * zoom
    r = rng.uniform(14, 22) * W / 64
    cx, cy = (rng.uniform(22, 42, size=2) * W / 64)
    turn = rng.uniform(0, 2 * np.pi)
    mask = Image.new("L", (W, W), 0)
    d = ImageDraw.Draw(mask)
    d.polygon(shape_outline(shape, cx, cy, r, turn), fill=255)
    if fill == "outline":  # the same figure at 55% cut out of its middle (a bar keeps a frame; the crescent, a rim)
        d.polygon(shape_outline(shape, cx, cy, 0.55 * r, turn), fill=0)
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.95))
    figure = Image.new("RGB", (W, W), tuple(round(255 * c) for c in rgb))
    if fill == "hatched":  # diagonal lines in a dark shade of the colour, across the figure's own axis
        axis = np.arange(W, dtype=np.float32) * (64 / W)
        u = (axis[None, :] * np.cos(turn + np.pi / 4) + axis[:, None] * np.sin(turn + np.pi / 4) + rng.uniform(0, 6)) % 6
        figure.paste(tuple(round(255 * 0.3 * c) for c in rgb), mask=Image.fromarray((u < 2.5).astype(np.uint8) * 255))
    return on_background(figure, mask, rng, size)  # the garments' background and noise


def _shape_one(job):
    label, seed, index, img_size = job
    img = draw_shape(label, np.random.default_rng([seed, index]))
    if img_size != img.size[0]:  # as read_image brings the synthetic set's 64-px images to the training size
        img = img.resize((img_size, img_size), Image.BILINEAR)
    return np.asarray(img)


def make_shapes(num_images, img_size=32, seed=0, workers=2):
    """(images uint8 (n, 3, S, S), labels long (n,)): the shapes set in memory, classes balanced, deterministic in
    seed whatever the number of workers. Drawn at 64 px and resized to S as the synthetic set is."""
    labels = np.random.default_rng(seed).permutation(np.arange(num_images) % len(SHAPE_CLASSES))
    jobs = [(int(k), seed, i, img_size) for i, k in enumerate(labels)]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            images = pool.map(_shape_one, jobs, chunksize=64)
    else:
        images = [_shape_one(job) for job in jobs]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()

# -----------------------------------------------------------------------------
# prepared images: every image of a split decoded once, by read_image, into a uint8 array on disk (data.py prepare)
#
# prepared/{split}_{S}.npy holds (n, 3, S, S) uint8, row i the split's i-th listed image; {split}_{S}.json beside it
# records how it was made: the transform's version, S, n, a hash of the split's list of image paths, and the rows
# that hold no image (missing or unreadable when prepared; left zero). A reader maps the array read-only, so every
# rank and loader worker on a machine shares one copy in the page cache, and refuses one that does not match.

PREPARED_VERSION = 1  # raised whenever read_image's transform changes, so that arrays made by an older one are refused


def prepared_split(name, split):
    """The prepared array that holds a split's images: zappos's splits share one image list (filenames.json)."""
    return "images" if name == "zappos" else split


def prepared_names(name, root):
    """{prepared split: the image paths it holds, relative to root}, in the order of the split's list."""
    if name == "zappos":
        return {"images": [os.path.join("ut-zap50k-images", p) for p in read_filenames(os.path.join(root, "filenames.json"))]}
    return {s: read_filenames(os.path.join(root, f"filenames_{s}.txt")) for s in ("train", "valid", "test")}


def prepared_files(root, split, img_size):
    """(array, header) paths of a split's prepared images at img_size."""
    base = os.path.join(root, "prepared", f"{split}_{img_size}")
    return base + ".npy", base + ".json"


def _fingerprint(names):
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class PreparedImages:
    """A split's prepared array, memory-mapped read-only on first use in each process: pickled into a loader worker
    it carries the path, not the pixels, and the worker maps the same file."""

    def __init__(self, path, header, fix):
        self.path, self.header, self.fix = path, header, fix
        self.missing = np.array(header["missing"], dtype=np.int64)
        self.unreadable = {int(i): e for i, e in header["unreadable"]}
        self._array = None

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    @property
    def array(self):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def take(self, rows):
        """uint8 (len(rows), 3, S, S): rows (an int array) copied out of the mapping."""
        return torch.from_numpy(self.array[np.asarray(rows, dtype=np.int64)])

    def check(self, rows, paths):
        """Refuse rows that hold no image; paths[k] names row rows[k]. The callers pass the rows of images that are
        there now: one that was missing when the array was made is a stale array; an unreadable one would stop the
        run when decoded too, so it stops it here, before any work."""
        rows = np.asarray(rows, dtype=np.int64)
        back = [paths[k] for k in np.flatnonzero(np.isin(rows, self.missing))]
        if back:
            raise ValueError(f"{self.path}: {len(back)} images were missing when it was made and are there now, "
                             f"e.g. {back[:3]}: {self.fix}")
        bad = [f"{paths[k]} ({self.unreadable[int(r)]})" for k, r in enumerate(rows) if int(r) in self.unreadable]
        if bad:
            raise OSError(f"{len(bad)} images could not be decoded when {self.path} was made, e.g. {bad[:3]}; "
                          f"'python data.py check --decode' lists them all")


def open_prepared(name, root, split, img_size):
    """The split's PreparedImages at img_size, or None when `data.py prepare` has not made them (then the images are
    decoded from their files). An array made for another size or by an older transform, from another list of images,
    without its header, or truncated is refused with a message that names the file and the fix."""
    split = prepared_split(name, split)
    npy, head = prepared_files(root, split, img_size)
    if not (os.path.exists(npy) or os.path.exists(head)):
        return None
    fix = (f"run 'python data.py prepare --data {name} --data-root {root} --img-size {img_size}' again "
           f"(or delete {npy} and {head} to decode the images instead)")
    if not os.path.isfile(head):
        raise ValueError(f"{npy}: no header {head} beside it (an interrupted prepare?): {fix}")
    if not os.path.isfile(npy):
        raise ValueError(f"{head}: the array {npy} is missing: {fix}")
    try:
        with open(head, encoding="utf-8") as f:
            header = json.load(f)
        made = (header["version"], header["img_size"], header["count"], header["fingerprint"])
        prepared = PreparedImages(npy, header, fix)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{head}: not a prepared-images header ({type(e).__name__}: {e}): {fix}") from None
    names = prepared_names(name, root)[split]
    listed = "filenames.json" if name == "zappos" else f"filenames_{split}.txt"
    if made[0] != PREPARED_VERSION:
        raise ValueError(f"{npy}: made by a data.py with another image transform (version {made[0]}, this one is "
                         f"{PREPARED_VERSION}): {fix}")
    if made[1] != img_size:
        raise ValueError(f"{npy}: holds images of {made[1]} px, not {img_size}: {fix}")
    if made[2:] != (len(names), _fingerprint(names)):
        raise ValueError(f"{npy}: {os.path.join(root, listed)} has changed since it was made ({made[2]} images then, "
                         f"{len(names)} now): {fix}")
    try:
        array = np.load(npy, mmap_mode="r")
    except Exception as e:  # a broken .npy header raises anything from ValueError to SyntaxError
        raise ValueError(f"{npy}: cannot be mapped (truncated?): {type(e).__name__}: {e}: {fix}") from None
    if array.dtype != np.uint8 or array.shape != (len(names), 3, img_size, img_size):
        raise ValueError(f"{npy}: holds {array.dtype} {array.shape}, not uint8 {(len(names), 3, img_size, img_size)}: {fix}")
    if os.path.getsize(npy) != array.offset + array.nbytes:
        raise ValueError(f"{npy}: {os.path.getsize(npy)} bytes, {array.offset + array.nbytes} expected (truncated?): {fix}")
    return prepared


def describe_images(name, root, split, img_size):
    """Where a split's images come from, for the one line train.py and evaluate.py print; refuses a stale array."""
    p = open_prepared(name, root, split, img_size)
    return f"{p.path} (prepared, memory-mapped)" if p else "decoded from the image files ('python data.py prepare' makes arrays)"


def _prepare_rows(job):
    """Decode rows start.. of a split into the array being written; return how many, and the rows without an image."""
    path, paths, start, img_size = job
    out = np.load(path, mmap_mode="r+")
    missing, unreadable = [], []
    for i, p in enumerate(paths, start):
        try:
            out[i] = read_image(p, img_size).numpy()
        except FileNotFoundError:
            missing.append(i)
        except OSError as e:
            unreadable.append((i, str(e.__cause__ or e)))
    out.flush()
    return len(paths), missing, unreadable


def prepare_images(name, root, img_size, workers=2, splits=None):
    """python data.py prepare: decode every image of each split (or of `splits`) once with read_image into
    prepared/{split}_{S}.npy and its header, written under temporary names and then renamed. Missing and unreadable
    images are reported by name and their rows left zero; the readers leave them out as they do when decoding."""
    for split, names in prepared_names(name, root).items():
        if splits is not None and split not in splits:
            continue
        paths, (npy, head) = [os.path.join(root, n) for n in names], prepared_files(root, split, img_size)
        n, t0 = len(paths), time.time()
        if n == 0:
            print(f"{split}: no images listed; nothing to prepare")
            continue
        os.makedirs(os.path.dirname(npy), exist_ok=True)
        size, free = n * 3 * img_size**2, shutil.disk_usage(os.path.dirname(npy)).free
        if size > free:
            raise OSError(f"{npy}: needs {size / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free there")
        print(f"{split}: {n} images at {img_size} px into {npy} ({size / 2**20:,.0f} MiB), {workers} processes", flush=True)
        tmp = f"{npy}.tmp{os.getpid()}"
        try:
            # writes the .npy header and n zero rows (a sparse file); the workers fill the rows in place
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, img_size, img_size)).flush()
            chunk = max(1, min(256, n // (8 * workers)))
            jobs = [(tmp, paths[s:s + chunk], s, img_size) for s in range(0, n, chunk)]
            missing, unreadable, done, shown = [], [], 0, time.time()
            with multiprocessing.Pool(workers) as pool:  # leaving the block (an error, Ctrl-C) ends the workers
                for k, m, u in pool.imap_unordered(_prepare_rows, jobs):
                    done += k
                    missing += m
                    unreadable += u
                    if time.time() - shown > 10 or done == n:
                        rate = done / (time.time() - t0)
                        print(f"  {done}/{n} images, {rate:.0f} img/s, eta {(n - done) / rate / 60:.1f} min", flush=True)
                        shown = time.time()
            header = dict(version=PREPARED_VERSION, dataset=name, split=split, img_size=img_size, count=n,
                          fingerprint=_fingerprint(names), missing=sorted(missing), unreadable=sorted(unreadable),
                          layout="(count, 3, S, S) uint8 RGB; row i is read_image of the split's i-th image",
                          made=time.strftime("%Y-%m-%d %H:%M:%S"))
            with open(head + ".tmp", "w", encoding="utf-8") as f:
                json.dump(header, f)
            if os.path.exists(head):
                os.remove(head)  # the old header goes first: an interruption leaves an array without one, refused
            os.replace(tmp, npy)
            os.replace(head + ".tmp", head)
        finally:
            for p in (tmp, head + ".tmp"):
                if os.path.exists(p):
                    os.remove(p)
        print(f"{split}: wrote {npy} in {time.time() - t0:.1f} s")
        gone, bad = [paths[i] for i in sorted(missing)], [f"{paths[i]} ({e})" for i, e in sorted(unreadable)]
        for what, items in (("missing images", gone), ("unreadable images", bad)):  # as data.py check prints them
            print(f"{what}: {len(items)}" + "".join(f"\n  {b}" for b in items[:5]) + ("\n  ..." if len(items) > 5 else ""))
        if gone or bad:
            print(f"  (all listed in {head}; as when decoding, training leaves the missing ones out and evaluation "
                  f"refuses them; an unreadable image stops both)")

# -----------------------------------------------------------------------------
# data.py check: counts, chance level, missing and unreadable images, bad lines

def check(name, root, decode=False):
    """Print what the dataset holds and what is wrong with it; return the exit code (0: nothing wrong)."""
    errors, paths = [], []
    found = check_folder(name, root)
    missing = [p for p in required_files(name, root) if not os.path.isfile(p)]
    if missing:
        for p in missing:
            print(f"missing: {p}")
        if found and name not in found:
            print(f"{looks_like(root, found)}: add " + " or ".join(f"--data {n}" for n in found))
        else:
            print(HINTS.get(name, HINTS["asen"]) if name != "synthetic" else
                  "create it with: python data.py synth --out " + root)
        return 1
    meta = load_meta(name, root)
    A = len(meta["attributes"])
    if name == "zappos":
        paths = zappos_paths(root)
        print(f"zappos: {len(paths)} images")
        for split in ZAPPOS_SPLITS:
            t = read_zappos_triplets(root, split, None, len(paths), errors)
            per = np.bincount(t[:, 3], minlength=A)
            print(f"{split:>6}: {len(t)} triplets: " + ", ".join(f"{c} {n}" for c, n in zip(meta["attributes"], per)))
    else:
        names = {s: read_filenames(os.path.join(root, f"filenames_{s}.txt")) for s in ("train", "valid", "test")}
        paths = [os.path.join(root, p) for s in names for p in names[s]]
        labels = read_labels(os.path.join(root, "label_train.txt"), len(names["train"]), meta, True, errors)
        print(f"{name}: {len(meta['attributes'])} attributes, {sum(map(len, meta['values']))} values; images: "
              + ", ".join(f"{s} {len(v)}" for s, v in names.items()))
        table = {s: {r: read_items(name, root, s, r, errors)[1] for r in ("query", "candidate")}
                 for s in ("valid", "test")}
        print(f"{'attribute':<24}{'values':>7}{'train imgs':>11}{'no pos.':>8}"
              + "".join(f"{s + ' q/c':>14}{'chance':>8}" for s in table))
        chance = {s: chance_ap(t["query"], t["candidate"]) for s, t in table.items()}
        for a, attr in enumerate(meta["attributes"]):
            counts = np.bincount(labels[labels[:, 1] == a, 2], minlength=len(meta["values"][a]))
            images = len(np.unique(labels[labels[:, 1] == a, 0]))
            line = f"{attr:<24}{len(counts):>7}{images:>11}{int((counts < 2).sum()):>8}"  # no pos.: < 2 images
            for s, t in table.items():
                q, c = t["query"][:, 1] == a, t["candidate"][:, 1] == a
                line += f"{f'{q.sum()}/{c.sum()}':>14}{chance[s][q].mean() if q.any() else 0:>8.3f}"
            print(line)
        for s, t in table.items():
            # an image listed twice under one attribute (as a query and a candidate, say) would find itself;
            # under two attributes it is two items (data.py import lists an image under each of its labels)
            pairs = np.concatenate([t["query"][:, :2], t["candidate"][:, :2]])
            dup = len(pairs) - len(np.unique(pairs, axis=0))
            print(f"{s}: {len(t['query'])} queries, {len(t['candidate'])} candidates, "
                  f"chance mAP {chance[s].mean():.4f} (query-weighted)"
                  + (f"; warning: {dup} images listed twice under one attribute" if dup else ""))
    # every listed image: present, and an image (header parse; --decode decodes each one fully)
    absent, unreadable = [], []
    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            absent.append(p)
            continue
        try:
            with Image.open(p) as im:
                if decode:
                    im.load()
        except Exception as e:
            unreadable.append(f"{p} ({e})")
        if (i + 1) % 20000 == 0:
            print(f"  looked at {i + 1}/{len(paths)} images")
    for what, bad in (("bad lines", errors), ("missing images", absent), ("unreadable images", unreadable)):
        print(f"{what}: {len(bad)}" + "".join(f"\n  {b}" for b in bad[:5]) + ("\n  ..." if len(bad) > 5 else ""))
    ok = not (errors or absent or unreadable)
    print("OK" if ok else "PROBLEMS FOUND")
    return 0 if ok else 1

# -----------------------------------------------------------------------------
# data.py import: a catalogue's CSV of labels -> the ASEN-format folder that the rest of the project reads
#
# Two layouts, told apart by the header: long (`path,attribute,value`, one label a row) and wide
# (`path,<attribute 1>,<attribute 2>,...`, an empty cell meaning "not labelled"); values are names. FashionAI's
# own Annotations/label.csv (`path,attribute,ynnn...`, no header) imports with format "fashionai".

IMPORT_FORMATS = ("auto", "long", "wide", "fashionai")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # search.py's folder walk too
QUERY_SHARE = 0.2  # within valid and test, per attribute: one query to four candidates (ASEN's 3,600 / 14,400)


def _fashionai_row(fields):
    """(attribute, value index, value names) of a FashionAI label row, or a message saying what is wrong.
    The value is the position of the one 'y'; 'm' marks a "maybe" and is not the value."""
    if len(fields) != 3:
        return f"expected 'path,attribute,labels', got {len(fields)} fields"
    attr, marks = fields[1].strip(), fields[2].strip().lower()
    attr = attr[:-len("_labels")] if attr.endswith("_labels") else attr  # FashionAI writes "skirt_length_labels"
    if not marks or set(marks) - set("ynm") or marks.count("y") != 1:
        return f"labels must be a string of y/n/m with exactly one 'y', got {fields[2]!r}"
    names = FASHIONAI_VALUE_NAMES.get(attr) or [f"value {j}" for j in range(len(marks))]
    if len(marks) != len(names):
        return f"{attr} has {len(names)} values, the labels string has {len(marks)} marks"
    return attr, marks.index("y"), names


def read_catalogue(csv_path, fmt="auto"):
    """Read a catalogue CSV (UTF-8 with or without a byte-order mark, any line ends, quoted fields).
    Returns dict(format, attributes (in the file's order), values ({attribute: value names} for FashionAI, else
    None: the names are the sorted set seen), labels [(line, path, attribute, value name)], bad [messages])."""
    if fmt not in IMPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {IMPORT_FORMATS}")
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]  # line_num: the row's (last) line in the file
    except FileNotFoundError:
        raise FileNotFoundError(f"catalogue not found: {csv_path}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{csv_path}: not a UTF-8 CSV file: {e}") from None
    rows = [(n, row) for n, row in rows if any(cell.strip() for cell in row)]  # blank lines
    if not rows:
        raise ValueError(f"{csv_path}: empty: expected a header (path,attribute,value or path,<attribute>,...) and rows")
    n0, head = rows[0]
    header = [h.strip() for h in head]
    if fmt == "auto":
        if [h.lower() for h in header] == ["path", "attribute", "value"]:
            fmt = "long"
        elif len(header) == 3 and not isinstance(_fashionai_row(head), str):
            fmt = "fashionai"  # a label row where a header would be: FashionAI's file has none
        else:
            fmt = "wide"
    labels, bad, attributes, values = [], [], [], None
    if fmt == "fashionai":
        values = {}
        if isinstance(_fashionai_row(head), str):  # a header line someone added
            rows = rows[1:]
        for n, row in rows:
            got = _fashionai_row(row)
            if isinstance(got, str):
                bad.append(f"{csv_path}:{n}: {got}")
                continue
            attr, v, names = got
            if len(values.get(attr, names)) != len(names):
                bad.append(f"{csv_path}:{n}: {attr} had {len(values[attr])} marks on earlier rows, {len(names)} here")
                continue
            if attr not in values:
                attributes.append(attr)
                values[attr] = names
            labels.append((n, row[0].strip(), attr, names[v]))
    elif fmt == "long":
        if [h.lower() for h in header] != ["path", "attribute", "value"]:
            raise ValueError(f"{csv_path}:{n0}: the long layout's header is 'path,attribute,value', got {','.join(head)!r}")
        for n, row in rows[1:]:
            if len(row) != 3:
                bad.append(f"{csv_path}:{n}: expected 3 fields (path,attribute,value), got {len(row)}")
                continue
            path, attr, value = (c.strip() for c in row)
            if not attr:
                bad.append(f"{csv_path}:{n}: no attribute")
                continue
            if attr not in attributes:
                attributes.append(attr)
            labels.append((n, path, attr, value))
    else:  # wide
        attributes = header[1:]
        if not attributes or not all(attributes) or len(set(attributes)) != len(attributes):
            raise ValueError(f"{csv_path}:{n0}: the wide layout's header is path,<attribute>,<attribute>,... with distinct, "
                             f"non-empty names (or 'path,attribute,value' for the long layout), got {','.join(head)!r}")
        for n, row in rows[1:]:
            if len(row) > len(header):
                bad.append(f"{csv_path}:{n}: {len(row)} fields, the header has {len(header)}")
                continue
            cells = [c.strip() for c in row] + [""] * (len(header) - len(row))  # spreadsheets drop trailing blanks
            labels += [(n, cells[0], a, v) for a, v in zip(attributes, cells[1:])]
    kept = []
    for n, path, attr, value in labels:
        if not path:
            bad.append(f"{csv_path}:{n}: no path")
        elif "\n" in path or "\r" in path:
            bad.append(f"{csv_path}:{n}: a line break inside the path {path!r}")
        elif value:  # an empty value is "not labelled"
            kept.append((n, os.path.normpath(path), attr, value))  # "./a.jpg" and "a.jpg" are one image
    return dict(format=fmt, attributes=attributes, values=values, labels=kept, bad=bad)


def _image_problem(path):
    """None if `path` decodes as an image, else why not. JPEGs decode at a reduced scale (draft): fast, and a
    truncated file still fails."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _write_text(path, lines):
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(path + ".tmp", path)


def _examples(items, k=5):
    return "".join(f"\n  {x}" for x in items[:k]) + (f"\n  ... ({len(items) - k} more)" if len(items) > k else "")


def import_catalogue(csv_path, out, image_root=None, seed=0, fmt="auto", valid_frac=0.1, test_frac=0.1, workers=8,
                     log=print):
    """Write the ASEN-format folder `out` from a catalogue CSV and print what it holds and what was left out.

    Images: paths in the CSV are relative to image_root (default: the CSV's folder; for FashionAI's label.csv,
    which sits in Annotations/, the folder above it) or absolute. The split files name them relative to `out`,
    so that `out` and the images can move together. Missing and unreadable images are left out, and so are
    labels that the CSV gives two different values (a conflict); a label repeated is kept once.
    Split: by image (one image in one split only), the images sorted by path and shuffled with `seed`:
    valid_frac and test_frac of them, at least one each, the rest train. In valid and test, per attribute, the
    images labelled with it are dealt into queries and candidates at 1:4 (an image labelled with several
    attributes is listed under each). The result depends on the seed and the rows, not on their order.
    Returns a summary dict; raises ValueError when nothing usable remains."""
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(f"valid and test fractions must be in (0, 1) and sum below 1, got {valid_frac}, {test_frac}")
    cat = read_catalogue(csv_path, fmt)
    fmt, attributes = cat["format"], cat["attributes"]
    if image_root is None:
        image_root = os.path.dirname(os.path.abspath(csv_path))
        if fmt == "fashionai":  # Annotations/label.csv names images Images/<attribute>_labels/...
            image_root = os.path.dirname(image_root)
    log(f"{csv_path}: {fmt} layout, {len(attributes)} attributes, {len(cat['labels'])} labels; images under {image_root}")
    if cat["bad"]:
        log(f"rows left out: {len(cat['bad'])}" + _examples(cat["bad"]))

    # labels per image; the same (path, attribute) twice: once if the value agrees, dropped if it does not
    by_image, duplicates, conflicted, conflict_lines = {}, 0, set(), []
    for n, path, attr, value in cat["labels"]:
        have = by_image.setdefault(path, {})
        if (path, attr) in conflicted:
            continue
        if attr not in have:
            have[attr] = value
        elif have[attr] == value:
            duplicates += 1
        else:
            conflicted.add((path, attr))
            conflict_lines.append(f"{csv_path}:{n}: {path}: {attr} is {have.pop(attr)!r} and {value!r}")
    if duplicates:
        log(f"duplicate labels (the same path, attribute and value again): {duplicates}, each kept once")
    if conflict_lines:
        log(f"conflicting labels (one image, one attribute, two values): {len(conflict_lines)}, left unlabelled"
            + _examples(conflict_lines))
    values = cat["values"] or {a: sorted({v for _, _, at, v in cat["labels"] if at == a}) for a in attributes}
    empty = [a for a in attributes if not values[a]]
    if empty:
        log(f"attributes without a single label (left out): {', '.join(empty)}")
        attributes = [a for a in attributes if values[a]]

    # every labelled image must be there and decode
    paths = sorted(p for p, have in by_image.items() if have)
    resolved = [os.path.join(image_root, p) for p in paths]
    t0 = time.time()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # pillow decodes without the GIL: threads suffice
        problems = list(pool.map(_image_problem, resolved, chunksize=64))
    missing = [r for r, why in zip(resolved, problems) if why == "missing"]
    unreadable = [f"{r}: {why}" for r, why in zip(resolved, problems) if why not in (None, "missing")]
    log(f"looked at {len(paths)} images in {time.time() - t0:.1f} s: {len(missing)} missing, {len(unreadable)} unreadable")
    if missing:
        log(f"missing images (left out): {len(missing)}" + _examples(missing))
    if unreadable:
        log(f"unreadable images (left out): {len(unreadable)}" + _examples(unreadable))
    good = [i for i, why in enumerate(problems) if why is None]
    if not good:
        raise ValueError(f"{csv_path}: nothing usable: none of the {len(paths)} labelled images could be read "
                         f"(paths are taken relative to {image_root}; give --image-root)")

    # split by image, then per attribute into queries and candidates
    rng = np.random.default_rng(seed)
    order = [good[i] for i in rng.permutation(len(good))]
    n_valid, n_test = (max(1, round(len(good) * f)) for f in (valid_frac, test_frac))
    if len(good) - n_valid - n_test < 2:
        raise ValueError(f"{csv_path}: nothing usable: {len(good)} readable labelled images are too few for a training "
                         f"split beside {n_valid} valid and {n_test} test images")
    splits = {"valid": sorted(order[:n_valid]), "test": sorted(order[n_valid:n_valid + n_test]),
              "train": sorted(order[n_valid + n_test:])}
    A = {a: k for k, a in enumerate(attributes)}
    V = {a: {v: j for j, v in enumerate(values[a])} for a in attributes}
    label = lambda i: [(A[a], V[a][v]) for a, v in by_image[paths[i]].items()]  # noqa: E731
    files = {}
    for s, ids in splits.items():
        files[f"filenames_{s}.txt"] = [os.path.relpath(os.path.abspath(resolved[i]), os.path.abspath(out)) for i in ids]
    files["label_train.txt"] = [f"{fid} " + " ".join(f"{a} {v}" for a, v in sorted(label(i)))
                                for fid, i in enumerate(splits["train"])]
    counts = np.zeros((3, sum(len(values[a]) for a in attributes)), dtype=np.int64)  # (split, value) images
    offset = np.cumsum([0] + [len(values[a]) for a in attributes])
    roles = {}
    for s_id, (s, ids) in enumerate([(s, splits[s]) for s in ("train", "valid", "test")]):
        for fid, i in enumerate(ids):
            for a, v in label(i):
                counts[s_id, offset[a] + v] += 1
        if s == "train":
            continue
        rows = {"query": [], "candidate": []}
        for a in range(len(attributes)):
            mine = [(fid, v) for fid, i in enumerate(ids) for b, v in label(i) if b == a]
            perm = np.random.default_rng([seed, s_id, a]).permutation(len(mine))
            n_q = max(1, round(len(mine) * QUERY_SHARE)) if len(mine) >= 2 else 0  # a lone image is a candidate
            roles[s, a] = (n_q, len(mine) - n_q)
            for k, j in enumerate(perm):
                rows["query" if k < n_q else "candidate"].append((mine[j][0], a, mine[j][1]))
        for role, r in rows.items():
            files[f"{role}_{s}.txt"] = [f"{fid} {a} {v}" for fid, a, v in sorted(r)]

    # what it holds; what cannot give a triplet
    log(f"split (seed {seed}): train {len(splits['train'])}, valid {len(splits['valid'])}, test {len(splits['test'])} images")
    log(f"{'attribute':<20} {'value':<24} {'train':>6} {'valid':>6} {'test':>6}")
    few, drawable = [], []
    for a, attr in enumerate(attributes):
        for v, name in enumerate(values[attr]):
            c = counts[:, offset[a] + v]
            log(f"{attr if v == 0 else '':<20} {name:<24} {c[0]:>6} {c[1]:>6} {c[2]:>6}")
            if c[0] < 2:
                few.append(f"{attr} = {name} ({c[0]} training images)")
        tr = counts[0, offset[a]:offset[a + 1]]
        if (tr >= 2).any() and (tr >= 1).sum() >= 2:
            drawable.append(attr)
        log(f"{'':<20} {'queries / candidates':<24} {'':>6} " + " ".join(f"{'%d/%d' % roles[s, a]:>6}" for s in ("valid", "test")))
    if few:
        log(f"values that cannot give a triplet (fewer than 2 training images): {len(few)}" + _examples(few, 10))
    if not drawable:
        raise ValueError(f"{csv_path}: nothing usable: no attribute has a value with 2 training images and another value "
                         f"with 1, so no training triplet can be drawn")
    no_query = [s for s in ("valid", "test") if not any(roles[s, a][0] for a in range(len(attributes)))]
    if no_query:
        raise ValueError(f"{csv_path}: nothing usable for evaluation: no query in the {' and '.join(no_query)} split "
                         f"(no attribute is labelled on 2 of its images); raise --valid-frac / --test-frac or add labels")

    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):  # an earlier import: unfinished until the new meta.json
        os.remove(os.path.join(out, "meta.json"))
    for name, lines in files.items():
        _write_text(os.path.join(out, name), lines)
    meta = {"ATTRIBUTES": attributes, "ATTRIBUTES_NUM": {a: len(values[a]) for a in attributes},
            "ATTRIBUTES_VALUES": values, "IMPORTED_FROM": os.path.abspath(csv_path), "SEED": seed}
    with open(os.path.join(out, "meta.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))  # last: marks a finished folder
    log(f"wrote {out}; train with: python train.py --data custom --data-root {out} --pretrained WEIGHTS")
    return dict(format=fmt, attributes=attributes, values=values, splits={s: len(v) for s, v in splits.items()},
                missing=missing, unreadable=unreadable, duplicates=duplicates, conflicts=conflict_lines, bad=cat["bad"],
                few=few)


def add_import_parser(sub):
    p = sub.add_parser("import", help="write the ASEN-format folder from a catalogue's CSV of labels")
    p.add_argument("csv", help="the CSV: path,attribute,value (long) or path,<attribute>,... (wide), a header first")
    p.add_argument("--out", required=True, help="the folder to write (train.py --data custom --data-root OUT)")
    p.add_argument("--image-root", default=None, help="folder the CSV's paths are relative to (default: the CSV's folder; "
                                                       "fashionai: the folder above Annotations/)")
    p.add_argument("--format", default="auto", choices=IMPORT_FORMATS, help="CSV layout (auto: long or wide by the header, "
                                                                            "fashionai by its y/n/m labels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split: the same seed and rows give the same files")
    p.add_argument("--valid-frac", type=float, default=0.1, help="share of the images in the validation split")
    p.add_argument("--test-frac", type=float, default=0.1, help="share of the images in the test split")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images to check them")


def run_import(args):
    try:
        import_catalogue(args.csv, args.out, args.image_root, args.seed, args.format, args.valid_frac, args.test_frac,
                         args.workers)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the synthetic dataset in the ASEN format")
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--num-train", type=int, default=6000, help="training images")
    p.add_argument("--num-query", type=int, default=400, help="queries in each of valid and test")
    p.add_argument("--num-candidate", type=int, default=1600, help="candidates in each of valid and test")
    p.add_argument("--seed", type=int, default=0, help="seed: the same seed writes the same bytes")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--workers", type=int, default=2, help="processes drawing images (output does not depend on it)")
    p = sub.add_parser("check", help="count, validate and look for every image of a dataset")
    p.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/NAME)")
    p.add_argument("--decode", action="store_true", help="decode every image fully (slow), not just its header")
    p = sub.add_parser("prepare", help="decode every image once into uint8 arrays that training and evaluation map")
    p.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/NAME); the arrays go to its prepared/")
    p.add_argument("--img-size", type=int, required=True, help="the image size the model is trained at (train.py --img-size)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: one per CPU)")
    add_import_parser(sub)  # data.py import
    args = parser.parse_args()
    if args.command == "import":
        sys.exit(run_import(args))
    if args.command == "synth":
        make_synthetic(args.out, args.num_train, args.num_query, args.num_candidate, args.seed, args.size,
                       args.workers)
    elif args.command == "prepare":
        if args.img_size < 1 or args.workers < 1:
            parser.error("--img-size and --workers must be at least 1")
        try:
            prepare_images(args.data, prepare_dataset(args.data, args.data_root)[0], args.img_size, args.workers)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    else:
        try:
            sys.exit(check(args.data, args.data_root or os.path.join("data", args.data), args.decode))
        except (OSError, ValueError) as e:  # a folder of another dataset, an unreadable meta.json: one line
            sys.exit(f"error: {e}")

"""
What training and evaluation read: the four benchmarks in their real file formats (and the synthetic set and
imported catalogues, written in ASEN's), the training split as conditioned triplets, the evaluation splits as
query/candidate items, and the images of either as uint8 from one store (prepared arrays, memory or the files).
The tools that write these folders are dataset_tools.py; the drawn sets are synthetic.py.

    from data import prepare_dataset, training_set, TripletBatches, EvalItems
    root, meta = prepare_dataset("fashionai", "data/fashionai")     # checks the folder, reads meta.json
    sampler, store = training_set("fashionai", root, 224, num_triplets=100_000)
    batches = TripletBatches(sampler.epoch(0), store, batch_size=64)  # batches[i]: uint8 a, p, n (64, 3, S, S), c (64,)

Formats (ASEN's split files; CSN's Zappos50K lists):
- fashionai, darn, deepfashion (ASEN's split): filenames_{train,valid,test}.txt (one relative image path
  a line), label_train.txt (`fid attr value [attr value ...]`), query_/candidate_{valid,test}.txt
  (`fid attr value`), meta.json (attribute names and value counts). Some files have CRLF line ends.
- zappos (CSN's split): filenames.json (plain text, one path a line, relative to ut-zap50k-images/) and
  tripletlists/{class,closure,gender,heel}_tripletlist_{train,val,test}.txt, lines `anchor far close`.
- synthetic: drawn by synthetic.py and written in exactly the ASEN format, so one code path loads both.
- custom: a folder that `dataset_tools.py import` wrote from a CSV of labels (path,attribute,value rows, or one
  column per attribute; or FashionAI's Annotations/label.csv), in the ASEN format, meta.json with the value names.
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from sampler import TripletSampler
from synthetic import SYNTH_VERSION, make_synthetic

DATASETS = ("synthetic", "fashionai", "darn", "deepfashion", "zappos", "custom")  # custom: written by dataset_tools.py import
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
    "custom": "write the folder from a CSV of labels with: python dataset_tools.py import CATALOGUE.csv --out DIR",
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
    """What a folder holds, judged from its own files: ["synthetic"] for a set drawn by synthetic.py (its meta.json
    has SYNTHETIC_VERSION), ["custom"] for one dataset_tools.py import wrote, ["zappos"] for CSN's files, the ASEN
    datasets its meta.json fits (one dataset's meta: the one with its attribute names; ASEN's combined file fits all
    three, unless the folder's name says which), or [] for none of these."""
    if os.path.isfile(os.path.join(root, "filenames.json")) and os.path.isdir(os.path.join(root, "tripletlists")):
        return ["zappos"]
    try:
        with open(os.path.join(root, "meta.json"), encoding="utf-8-sig") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict):
        return []
    if "SYNTHETIC_VERSION" in raw:
        return ["synthetic"]
    if "IMPORTED_FROM" in raw:  # written by dataset_tools.py import
        return ["custom"]
    if isinstance(raw.get("ATTRIBUTES"), list):  # one dataset's meta: its attribute names tell which, if known
        found = [n for n, attrs in ASEN_ATTRIBUTES.items() if set(attrs) == {str(a) for a in raw["ATTRIBUTES"]}]
        return found
    found = [n for n, section in ASEN_SECTIONS.items() if section in raw]
    named = [n for n in found if n in os.path.basename(os.path.normpath(root)).lower()]
    return named or found


def looks_like(root, found):
    """'ROOT looks like DARN (ASEN's split files)', for an error message."""
    form = {"zappos": "CSN's triplet lists", "synthetic": "drawn by synthetic.py", "custom": "written by dataset_tools.py import"}.get(
        found[0] if len(found) == 1 else None, "ASEN's split files")
    return f"{root} looks like {' or '.join(TITLES[n] for n in found)} ({form})"


def check_folder(name, root):
    """Refuse a folder whose own files show that it holds another dataset than --data says, before anything is
    read or written there: above all a real dataset under --data synthetic (the default), which would otherwise be
    taken for a synthetic set to redraw."""
    found = identify(root)
    if name == "synthetic" and found and found != ["synthetic"]:
        raise ValueError(f"{looks_like(root, found)}, not the synthetic set: add " + " or ".join(f"--data {n}" for n in found))
    if name != "synthetic" and found in (["synthetic"], ["custom"], ["zappos"]) and name not in found:
        raise ValueError(f"{looks_like(root, found)}, not {TITLES[name]}: add --data {found[0]}")
    if name == "synthetic" and not found and os.path.exists(os.path.join(root, "meta.json")):
        try:  # one that is not JSON at all says so
            with open(os.path.join(root, "meta.json"), encoding="utf-8-sig") as f:
                json.load(f)
        except ValueError as e:
            raise ValueError(f"{os.path.join(root, 'meta.json')}: not valid JSON: {e}") from None
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
            version = json.load(f)["SYNTHETIC_VERSION"]
        if version != SYNTH_VERSION:
            raise ValueError(f"{root} holds a synthetic set drawn by an older synthetic.py (version {version}, this one draws "
                             f"version {SYNTH_VERSION}): delete the folder to draw it anew, or give another --data-root")
    return root, load_meta(name, root)

# -----------------------------------------------------------------------------
# split-file readers; whitespace split() per line makes CRLF ends and tabs harmless

def _text(path):
    """The lines of a UTF-8 text file; a file of another encoding (or not text) is refused naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _lines(path):
    """(lineno, line, fields) of each non-blank line of a text file."""
    for lineno, line in enumerate(_text(path), 1):
        fields = line.split()
        if fields:
            yield lineno, line.rstrip("\r\n"), fields


def _fail(errors, msg):
    """Raise at the first bad line, or, when a list is given (dataset_tools.py check), collect them all."""
    if errors is None:
        raise ValueError(msg)
    errors.append(msg)


def read_filenames(path):
    return [line.strip() for line in _text(path) if line.strip()]


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
# images: decoded to uint8 in a loader worker or ahead of time, normalised once, on the device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # a gallery folder's images


def read_image(path, img_size):
    """(3, S, S) uint8: resize the short side to S, centre-crop (ASEN)."""
    try:
        with Image.open(path) as im:
            # a JPEG decodes at 1/2, 1/4 or 1/8 scale while it stays >= S: several times faster on large photos
            im.draft("RGB", (img_size, img_size))
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as e:  # truncated, not an image, decompression bomb: say which file
        raise OSError(f"cannot read image {path}: {e}") from e
    size, (left, top) = resize_plan(*im.size, img_size)
    if size:
        im = im.resize(size, Image.BILINEAR)
    im = im.crop((left, top, left + img_size, top + img_size))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def resize_plan(w, h, img_size):
    """read_image's geometry for a w x h image: the (w, h) its short side is resized to S at (torchvision's
    Resize(int): the long side truncated; None when the short side is S already), and the (left, top) of the centre
    crop in it (torchvision's CenterCrop). decode.py follows the same plan on the GPU."""
    size = None
    if min(w, h) != img_size:
        size = w, h = (img_size, int(img_size * h / w)) if w <= h else (int(img_size * w / h), img_size)
    return size, (int(round((w - img_size) / 2)), int(round((h - img_size) / 2)))


def normalise(x):
    """uint8 (..., 3, S, S) -> float32 in [-1, 1], the backbone's input (MEAN, STD)."""
    return (x.float() / 255 - MEAN[0]) / STD[0]


def load_image(path, img_size):
    """One image as the model takes it: (3, S, S) float32 in [-1, 1]."""
    return normalise(read_image(path, img_size))


def present(paths, what, missing="error", hint=""):
    """(n,) bool, which of `paths` are files (DARN's images are partly gone from the web). missing="error" refuses
    any gone, "drop" lets the caller leave them out; none there is refused either way. The error names a few."""
    keep = np.array([os.path.isfile(p) for p in paths], dtype=bool)
    gone = [p for p, k in zip(paths, keep) if not k]
    if gone and (missing == "error" or len(gone) == len(paths)):
        raise FileNotFoundError(f"{len(gone)} of {len(paths)} {what} images are missing, e.g. {gone[:5]}; "
                                f"'python dataset_tools.py check' lists them all" + (hint if missing == "error" else ""))
    return keep


class ImageStore:
    """The images of one split by row (the split's list of image paths): uint8 (n, 3, S, S) for any rows, from the
    split's prepared array when `dataset_tools.py prepare` made one at this size (memory-mapped: nothing to decode,
    one copy in the page cache for every process), else from memory (cache=True: `rows` decoded once, up front;
    3 * S * S bytes each: 18 MB for the synthetic set at 32 px, 15 GB for 100,000 images at 224 px), else decoded
    from the files at each take. Pickled into a loader worker it carries paths, not a mapping.
    `rows`: the rows that will be taken; a prepared array is checked to hold an image at each."""

    def __init__(self, name, root, split, paths, img_size, rows, cache=False, prepared=True):
        self.paths, self.img_size = paths, img_size
        self.prepared = open_prepared(name, root, split, img_size) if prepared else None
        self.images = None
        if self.prepared is not None:
            self.prepared.check(rows, [paths[r] for r in rows])
        elif cache:
            self._cache(np.asarray(rows))

    def _cache(self, rows):
        t0, n = time.time(), len(rows)
        self.slot = np.full(len(self.paths), -1)  # row -> place in self.images
        self.slot[rows] = np.arange(n)
        self.images = torch.empty(n, 3, self.img_size, self.img_size, dtype=torch.uint8)
        for k, r in enumerate(rows):
            self.images[k] = read_image(self.paths[r], self.img_size)
            if (k + 1) % 20_000 == 0:
                print(f"caching images: {k + 1}/{n} ({time.time() - t0:.0f} s)", flush=True)
        print(f"cached {n} images at {self.img_size} px in memory ({self.images.numel() / 2**20:.0f} MiB, "
              f"{time.time() - t0:.1f} s)", flush=True)

    @property
    def stored(self):
        """True when a take copies pixels (prepared or cached), False when it decodes files."""
        return self.prepared is not None or self.images is not None

    def describe(self):
        """Where the images come from, for the one line train.py prints."""
        return "decoded once into memory" if self.images is not None else describe_prepared(self.prepared)

    def take(self, rows):
        """uint8 (len(rows), 3, S, S): fresh copies, free to change in place."""
        if self.prepared is not None:
            return self.prepared.take(rows)
        if self.images is not None:
            return self.images[torch.from_numpy(self.slot[np.asarray(rows)])]
        return torch.stack([read_image(self.paths[r], self.img_size) for r in rows])


# -----------------------------------------------------------------------------
# prepared images: every image of a split decoded once, by read_image, into a uint8 array on disk (dataset_tools.py prepare)
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


def fingerprint(names):
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
                          f"'python dataset_tools.py check --decode' lists them all")


def open_prepared(name, root, split, img_size):
    """The split's PreparedImages at img_size, or None when `dataset_tools.py prepare` has not made them (then the images are
    decoded from their files). An array made for another size or by an older transform, from another list of images,
    without its header, or truncated is refused with a message that names the file and the fix."""
    split = prepared_split(name, split)
    npy, head = prepared_files(root, split, img_size)
    if not (os.path.exists(npy) or os.path.exists(head)):
        return None
    fix = (f"run 'python dataset_tools.py prepare --data {name} --data-root {root} --img-size {img_size}' again "
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
        raise ValueError(f"{npy}: made by another version of read_image (version {made[0]}, this one is "
                         f"{PREPARED_VERSION}): {fix}")
    if made[1] != img_size:
        raise ValueError(f"{npy}: holds images of {made[1]} px, not {img_size}: {fix}")
    if made[2:] != (len(names), fingerprint(names)):
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


def describe_prepared(prepared):
    return f"{prepared.path} (prepared, memory-mapped)" if prepared else \
        "decoded from the image files ('python dataset_tools.py prepare' makes arrays)"


def describe_images(name, root, split, img_size):
    """Where a split's images come from, for the one line evaluate.py prints; refuses a stale array."""
    return describe_prepared(open_prepared(name, root, split, img_size))

# -----------------------------------------------------------------------------
# training: the triplets of sampler.py, batched from an ImageStore

def training_set(name, root, img_size, num_triplets, seed=0, rank=0, world_size=1, cache=False, prepared=True):
    """(TripletSampler, ImageStore) of a dataset's training split. Its images are looked for once, up front: the
    missing ones are reported and left out of every triplet, rather than crash a loader worker hours into a run."""
    meta = load_meta(name, root)
    if meta["format"] == "zappos":
        paths = zappos_paths(root)
        fixed = read_zappos_triplets(root, "train", num_triplets, len(paths))
        used = np.unique(fixed[:, :3])
    else:
        names = read_filenames(os.path.join(root, "filenames_train.txt"))
        paths = [os.path.join(root, n) for n in names]
        labels = read_labels(os.path.join(root, "label_train.txt"), len(names), meta, multi=True)
        used = np.unique(labels[:, 0])
    keep = present([paths[f] for f in used], "training", "drop")
    if not keep.all():
        print(f"warning: {(~keep).sum()} of {len(used)} training images are missing, e.g. "
              f"{[paths[f] for f in used[~keep][:5]]}; 'python dataset_tools.py check' lists them all; training without "
              "them", flush=True)
    if meta["format"] == "zappos":  # a triplet with a missing image is left out
        sampler = TripletSampler(seed=seed, rank=rank, world_size=world_size,
                                 fixed=fixed[~np.isin(fixed[:, :3], used[~keep]).any(1)])
    else:  # missing images never enter a triplet
        sampler = TripletSampler(num_triplets, seed, rank, world_size, labels[np.isin(labels[:, 0], used[keep])],
                                 [len(v) for v in meta["values"]])
    return sampler, ImageStore(name, root, "train", paths, img_size, sampler.images(), cache, prepared)


class TripletBatches(torch.utils.data.Dataset):
    """An epoch's triplets as whole batches: item i is triplets i*B .. (i+1)*B-1 as uint8 anchors, positives and
    negatives (B, 3, S, S) from the store and their conditions (B,), each image mirrored left-right at random when
    flip (torch's generator: DataLoader seeds it per worker). Read in the training process or by DataLoader
    (batch_size=None) workers; the images travel as uint8, a quarter of float32's bytes, and are normalised on the
    device."""

    def __init__(self, triplets, store, batch_size, flip=True):
        self.triplets, self.store, self.batch_size, self.flip = triplets, store, batch_size, flip

    def __len__(self):
        return len(self.triplets) // self.batch_size

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.batch(np.arange(i * self.batch_size, (i + 1) * self.batch_size))

    def batch(self, rows, flips=None):
        """Triplets `rows` (an index array); flips (B, 3) bool, default random when flip."""
        t = self.triplets[rows]  # (B, 4)
        if flips is None:
            flips = torch.rand(len(t), 3) < 0.5 if self.flip else torch.zeros(len(t), 3, dtype=torch.bool)
        x = [self.store.take(t[:, j]) for j in range(3)]  # 3 x (B, 3, S, S) uint8
        for k, j in flips.nonzero().tolist():  # mirrored in place, one image at a time: several times faster at
            x[j][k] = x[j][k].flip(-1)         # 224 px than a where() over the batch, which flips every image
        return x[0], x[1], x[2], torch.from_numpy(t[:, 3].copy())

# -----------------------------------------------------------------------------
# evaluation sets: (uint8 image, condition, ..., index) items, normalised on the device by evaluate.embed_items

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
    """The query or candidate items of an ASEN split: (uint8 image, attribute, value, index). missing (EVAL_MISSING):
    "drop" leaves out the items whose image is missing; self.left_out of self.listed were."""

    def __init__(self, name, root, split, role, img_size, missing="error", prepared=True):
        names = read_filenames(os.path.join(root, f"filenames_{split}.txt"))
        self.paths, rows = read_items(name, root, split, role)
        self.listed = len(self.paths)
        keep = present(self.paths, f"{split} {role}", missing, DROP_HINT)
        self.paths, rows = [p for p, k in zip(self.paths, keep) if k], rows[keep]
        self.left_out = self.listed - len(self.paths)
        self.fids = rows[:, 0].copy()  # rows of the split's image list
        self.store = ImageStore(name, root, split, [os.path.join(root, n) for n in names], img_size, self.fids,
                                prepared=prepared)
        self.attrs, self.values = torch.from_numpy(rows[:, 1].copy()), torch.from_numpy(rows[:, 2].copy())

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.store.take([self.fids[i]])[0], int(self.attrs[i]), int(self.values[i]), i


class ZapposEvalSet(torch.utils.data.Dataset):
    """A zappos val/test list as unique (uint8 image, condition, index) items, each embedded once; triplets index
    the items. missing="drop" leaves out the triplets that use a missing image."""

    def __init__(self, root, split, img_size, num_triplets=None, missing="error", prepared=True):
        paths = zappos_paths(root)
        t = read_zappos_triplets(root, split, num_triplets or ZAPPOS_TRIPLETS[split], len(paths))  # (T, 4)
        self.listed = len(t)
        fids = np.unique(t[:, :3])
        keep = present([paths[f] for f in fids], f"zappos {split}", missing, DROP_HINT)
        t = t[~np.isin(t[:, :3], fids[~keep]).any(1)]
        if len(t) == 0:
            raise FileNotFoundError(f"zappos {split}: every triplet uses a missing image")
        self.left_out = self.listed - len(t)
        pairs = np.stack([t[:, :3].reshape(-1), np.repeat(t[:, 3], 3)], 1)  # (3T, 2): image, condition
        items, inverse = np.unique(pairs, axis=0, return_inverse=True)
        self.paths = [paths[f] for f in items[:, 0]]
        self.fids = items[:, 0].copy()  # rows of filenames.json
        self.store = ImageStore("zappos", root, split, paths, img_size, self.fids, prepared=prepared)
        self.item_conditions = torch.from_numpy(items[:, 1].copy())
        self.triplets = torch.from_numpy(inverse.reshape(-1, 3))  # (T, 3) item indices: anchor, far, close
        self.conditions = torch.from_numpy(t[:, 3].copy())  # (T,)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.store.take([self.fids[i]])[0], int(self.item_conditions[i]), i

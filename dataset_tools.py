"""
The tools that write or inspect a dataset on disk: draw the synthetic set, check a folder, decode its images
once into prepared arrays, and import a catalogue's CSV of labels into the ASEN format. Training and
evaluation read what these write through data.py.

    python dataset_tools.py synth --out data/synthetic                # write the synthetic set (20-40 s on 2 cores)
    python dataset_tools.py check --data synthetic                    # counts, chance mAP, missing images
    python dataset_tools.py check --data fashionai --data-root data/fashionai
    python dataset_tools.py prepare --data fashionai --img-size 224   # decode every image once, into prepared/ arrays
    python dataset_tools.py import catalogue.csv --out data/shop      # your own labels -> the ASEN format (--data custom)
"""
import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from data import (DATASETS, FASHIONAI_VALUE_NAMES, HINTS, PREPARED_VERSION, ZAPPOS_SPLITS, check_folder,
                  fingerprint, load_meta, looks_like, prepare_dataset, prepared_files, prepared_names, read_filenames,
                  read_image, read_items, read_labels, read_zappos_triplets, required_files, zappos_paths)
from evaluate import chance_ap
from runtime import number, output_folder, worker_pool
from synthetic import make_synthetic


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
    """python dataset_tools.py prepare: decode every image of each split (or of `splits`) once with read_image into
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
        tmp, head_tmp = f"{npy}.{os.getpid()}.tmp", f"{head}.{os.getpid()}.tmp"
        try:
            # writes the .npy header and n zero rows (a sparse file); the workers fill the rows in place
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, img_size, img_size)).flush()
            chunk = max(1, min(256, n // (8 * workers)))
            jobs = [(tmp, paths[s:s + chunk], s, img_size) for s in range(0, n, chunk)]
            missing, unreadable, done, shown = [], [], 0, time.time()
            with worker_pool(workers) as pool:
                for k, m, u in pool.imap_unordered(_prepare_rows, jobs):
                    done += k
                    missing += m
                    unreadable += u
                    if time.time() - shown > 10 or done == n:
                        rate = done / (time.time() - t0)
                        print(f"  {done}/{n} images, {rate:.0f} img/s, eta {(n - done) / rate / 60:.1f} min", flush=True)
                        shown = time.time()
            header = dict(version=PREPARED_VERSION, dataset=name, split=split, img_size=img_size, count=n,
                          fingerprint=fingerprint(names), missing=sorted(missing), unreadable=sorted(unreadable),
                          layout="(count, 3, S, S) uint8 RGB; row i is read_image of the split's i-th image",
                          made=time.strftime("%Y-%m-%d %H:%M:%S"))
            with open(head_tmp, "w", encoding="utf-8") as f:
                json.dump(header, f)
            if os.path.exists(head):
                os.remove(head)  # the old header goes first: an interruption leaves an array without one, refused
            os.replace(tmp, npy)
            os.replace(head_tmp, head)
        finally:
            for p in (tmp, head_tmp):
                if os.path.exists(p):
                    os.remove(p)
        print(f"{split}: wrote {npy} in {time.time() - t0:.1f} s")
        gone, bad = [paths[i] for i in sorted(missing)], [f"{paths[i]} ({e})" for i, e in sorted(unreadable)]
        for what, items in (("missing images", gone), ("unreadable images", bad)):  # as dataset_tools.py check prints them
            print(f"{what}: {len(items)}" + "".join(f"\n  {b}" for b in items[:5]) + ("\n  ..." if len(items) > 5 else ""))
        if gone or bad:
            print(f"  (all listed in {head}; as when decoding, training leaves the missing ones out and evaluation "
                  f"refuses them; an unreadable image stops both)")


# -----------------------------------------------------------------------------
# dataset_tools.py check: counts, chance level, missing and unreadable images, bad lines

def jpeg_ends(path):
    """Whether a JPEG file holds its end-of-image marker (FF D9) in its last 4 KB (some writers pad after it)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        return b"\xff\xd9" in f.read()


def check(name, root, decode=False):
    """Print what the dataset holds and what is wrong with it; return the exit code (0: nothing wrong)."""
    errors, paths, problems = [], [], []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder" + ("" if name == "synthetic" else "; " + HINTS.get(name, HINTS["asen"])))
    found = check_folder(name, root)
    missing = [p for p in required_files(name, root) if not os.path.isfile(p)]
    if missing:
        for p in missing:
            print(f"missing: {p}")
        if found and name not in found:
            print(f"{looks_like(root, found)}: add " + " or ".join(f"--data {n}" for n in found))
        else:
            print(HINTS.get(name, HINTS["asen"]) if name != "synthetic" else
                  "create it with: python dataset_tools.py synth --out " + root)
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
        for s, listed in names.items():
            twice = [p for p, n in Counter(listed).items() if n > 1]
            if twice:
                problems.append(f"filenames_{s}.txt lists {len(twice)} images more than once, e.g. {twice[:3]}")
        if not names["train"]:
            problems.append("filenames_train.txt lists no image: nothing to train on")
        labels = read_labels(os.path.join(root, "label_train.txt"), len(names["train"]), meta, True, errors)
        if names["train"] and len(labels) == 0:
            problems.append("label_train.txt has no label: nothing to train on")
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
            # under two attributes it is two items (dataset_tools.py import lists an image under each of its labels)
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
                elif im.format == "JPEG" and not jpeg_ends(p):  # truncated: caught without decoding
                    raise OSError("truncated: no JPEG end marker")
        except Exception as e:
            unreadable.append(f"{p} ({e})")
        if (i + 1) % 20000 == 0:
            print(f"  looked at {i + 1}/{len(paths)} images")
    for what, bad in (("bad lines", errors), ("missing images", absent), ("unreadable images", unreadable)):
        print(f"{what}: {len(bad)}" + "".join(f"\n  {b}" for b in bad[:5]) + ("\n  ..." if len(bad) > 5 else ""))
    for p in problems:
        print(f"problem: {p}")
    ok = not (errors or absent or unreadable or problems)
    print("OK" if ok else "PROBLEMS FOUND")
    return 0 if ok else 1

# -----------------------------------------------------------------------------
# dataset_tools.py import: a catalogue's CSV of labels -> the ASEN-format folder that the rest of the project reads
#
# Two layouts, told apart by the header: long (`path,attribute,value`, one label a row) and wide
# (`path,<attribute 1>,<attribute 2>,...`, an empty cell meaning "not labelled"); values are names. FashionAI's
# own Annotations/label.csv (`path,attribute,ynnn...`, no header) imports with format "fashionai".

IMPORT_FORMATS = ("auto", "long", "wide", "fashionai")
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
    tmp = f"{path}.{os.getpid()}.tmp"  # this process's own: another writer of the folder has another
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


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

    by_image, duplicates, conflict_lines = _labels_by_image(cat, csv_path, log)
    values = cat["values"] or {a: sorted({v for _, _, at, v in cat["labels"] if at == a}) for a in attributes}
    empty = [a for a in attributes if not values[a]]
    if empty:
        log(f"attributes without a single label (left out): {', '.join(empty)}")
        attributes = [a for a in attributes if values[a]]

    paths = sorted(p for p, have in by_image.items() if have)
    resolved, good, missing, unreadable = _readable(paths, image_root, workers, csv_path, log)
    splits, files, counts, roles = _split(paths, resolved, by_image, attributes, values, good, seed, valid_frac, test_frac,
                                          out, csv_path)
    few = _report(attributes, values, splits, counts, roles, seed, csv_path, log)
    meta = {"ATTRIBUTES": attributes, "ATTRIBUTES_NUM": {a: len(values[a]) for a in attributes},
            "ATTRIBUTES_VALUES": values, "IMPORTED_FROM": os.path.abspath(csv_path), "SEED": seed}
    _write_folder(out, files, meta)
    log(f"wrote {out}; train with: python train.py --data custom --data-root {out} --pretrained WEIGHTS")
    return dict(format=fmt, attributes=attributes, values=values, splits={s: len(v) for s, v in splits.items()},
                missing=missing, unreadable=unreadable, duplicates=duplicates, conflicts=conflict_lines, bad=cat["bad"],
                few=few)


def _labels_by_image(cat, csv_path, log):
    """{path: {attribute: value}}; the same (path, attribute) twice: once if the value agrees, dropped if it does not.
    Returns it with the number of duplicates and a line per conflict."""
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
    return by_image, duplicates, conflict_lines


def _readable(paths, image_root, workers, csv_path, log):
    """Every labelled image must be there and decode: (resolved paths, indices of the good ones, missing, unreadable)."""
    if not paths:
        raise ValueError(f"{csv_path}: nothing usable: no labelled rows after its header")
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

    return resolved, good, missing, unreadable


def _split(paths, resolved, by_image, attributes, values, good, seed, valid_frac, test_frac, out, csv_path):
    """Split by image, then per attribute into queries and candidates: (splits, {file name: lines}, (split, value)
    image counts, {(split, attribute): (queries, candidates)})."""
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

    return splits, files, counts, roles


def _report(attributes, values, splits, counts, roles, seed, csv_path, log):
    """Print what the folder will hold; return the values that cannot give a triplet; raise when no triplet can be
    drawn or a split has no query."""
    offset = np.cumsum([0] + [len(values[a]) for a in attributes])
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

    return few


def _write_folder(out, files, meta):
    """The split files, then meta.json last: its presence marks a finished folder."""
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):  # an earlier import: unfinished until the new meta.json
        os.remove(os.path.join(out, "meta.json"))
    for name, lines in files.items():
        _write_text(os.path.join(out, name), lines)
    _write_text(os.path.join(out, "meta.json"), [json.dumps(meta, indent=1, ensure_ascii=False)])  # last: marks a finished folder


def refuse_to_overwrite(out, overwrite):
    """A dataset's folder is written only when it holds none (no meta.json) or --overwrite says so; never a file."""
    output_folder(out, "--out folder")
    if os.path.exists(os.path.join(out, "meta.json")) and not overwrite:
        raise FileExistsError(f"{out}: holds a dataset already (its meta.json): give --overwrite to replace it, or "
                              "another --out")


def add_import_parser(sub):
    p = sub.add_parser("import", help="write the ASEN-format folder from a catalogue's CSV of labels")
    p.add_argument("csv", help="the CSV: path,attribute,value (long) or path,<attribute>,... (wide), a header first")
    p.add_argument("--out", required=True, help="the folder to write (train.py --data custom --data-root OUT)")
    p.add_argument("--image-root", default=None, help="folder the CSV's paths are relative to (default: the CSV's folder; "
                                                       "fashionai: the folder above Annotations/)")
    p.add_argument("--format", default="auto", choices=IMPORT_FORMATS, help="CSV layout (auto: long or wide by the header, "
                                                                            "fashionai by its y/n/m labels)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of the split: the same seed and rows give the same files")
    p.add_argument("--valid-frac", type=number(float, above=0), default=0.1, help="share of the images in the validation split")
    p.add_argument("--test-frac", type=number(float, above=0), default=0.1, help="share of the images in the test split")
    p.add_argument("--workers", type=number(int, 1), default=8, help="threads decoding images to check them")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def run_import(args):
    try:
        refuse_to_overwrite(args.out, args.overwrite)
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
    p.add_argument("--num-train", type=number(int, 2), default=6000, help="training images")
    p.add_argument("--num-query", type=number(int, 1), default=400, help="queries in each of valid and test")
    p.add_argument("--num-candidate", type=number(int, 1), default=1600, help="candidates in each of valid and test")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed: the same seed writes the same bytes")
    p.add_argument("--size", type=number(int, 8), default=64, help="image side in pixels")
    p.add_argument("--workers", type=number(int, 1), default=2, help="processes drawing images (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p = sub.add_parser("check", help="count, validate and look for every image of a dataset")
    p.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/NAME)")
    p.add_argument("--decode", action="store_true", help="decode every image fully (slow), not just its header")
    p = sub.add_parser("prepare", help="decode every image once into uint8 arrays that training and evaluation map")
    p.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/NAME); the arrays go to its prepared/")
    p.add_argument("--img-size", type=number(int, 1), required=True, help="the image size the model is trained at (train.py --img-size)")
    p.add_argument("--workers", type=number(int, 1), default=os.cpu_count(), help="decoding processes (default: one per CPU)")
    add_import_parser(sub)  # dataset_tools.py import
    args = parser.parse_args()
    # SIGTERM as Ctrl-C: either stops the command with one line; every writer here removes its temporary files
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.command == "import":
            sys.exit(run_import(args))
        if args.command == "synth":
            refuse_to_overwrite(args.out, args.overwrite)
            make_synthetic(args.out, args.num_train, args.num_query, args.num_candidate, args.seed, args.size,
                           args.workers)
        elif args.command == "prepare":
            prepare_images(args.data, prepare_dataset(args.data, args.data_root)[0], args.img_size, args.workers)
        else:
            sys.exit(check(args.data, args.data_root or os.path.join("data", args.data), args.decode))
    except (OSError, ValueError) as e:  # a folder of another dataset, an unreadable meta.json, a full disk: one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        left = {"prepare": "no temporary file is left, and the splits finished before keep their arrays",
                "synth": f"{out} has no meta.json, so no command takes it for a dataset: run synth again",
                "import": f"{out} has no meta.json until an import finishes: run the import again",
                "check": "nothing was written"}[args.command]
        sys.exit(f"error: {args.command} interrupted: {left}")

"""
Search a gallery by attribute with a trained model: the job CCA is trained for, "items with the same sleeve
length as this one, whatever their colour". Two steps: embed every gallery image under every attribute once
(index), then rank the gallery for a query image under one attribute, or under several at once by the weighted
sum of the per-attribute cosines, "the same sleeve length and the same colour" (query).

    python search.py index --ckpt runs/synthetic/best.pt --images my_photos/ --out gallery.idx
    python search.py index --ckpt runs/synthetic/best.pt --data-root data/synthetic --split test --out test.idx
    torchrun --nproc_per_node=8 search.py index --ckpt best.pt --images photo_list.txt --out gallery.idx
    python search.py query --index test.idx --ckpt runs/synthetic/best.pt --image data/synthetic/images/test/00007.jpg \\
        --attr sleeve_length --attr colour --topk 5 --out search.png
    python search.py bench                 # query latency on 1,000,000 random images x 8 attributes (CPU, or GPU)

index prints progress with img/s and an ETA; images it cannot read are skipped and listed at the end. A gallery
indexed from a labelled split (--data-root, --split) carries the items' value names, which query prints and draws.
query prints rank, score (the weighted sum of cosines), the cosine under each attribute, value names when known,
and the path; --json prints the same as JSON; --out draws the query and its results. The query image itself is
left out of its results when it is in the gallery.

From Python, the same two steps:

    import search
    from cca import load_checkpoint
    model, ckpt = load_checkpoint("runs/synthetic/best.pt")
    index = search.build_index(model, ["a.jpg", "b.jpg", ...], "gallery.idx", ckpt["meta"])
    hits = search.query(index, search.embed_image(model, "shirt.jpg"), ["sleeve_length", "colour"], [1.0, 0.5], topk=5)

The index file holds no pickle (an index may come from someone else) and is written to a temporary file beside OUT, then renamed:
  bytes 0-63        b"CCAINDEX", then zeros
  bytes 64-         the embeddings, float16 little-endian, shape (K, N, D): attribute k's N vectors are
                    contiguous, so a query under one attribute reads 1/K of the file (np.memmap)
  then              a UTF-8 JSON header: shape, paths, attributes, value names, labels (N x K value indices,
                    -1 unknown; null without labels), the images left out and why, and the checkpoint's identity
                    (the SHA-256 of the model's weights, and its config)
  last 16 bytes     the header's length (uint64 little-endian), b"CCAINDEX"
"""

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from cca import load_checkpoint
from decode import FileBytes, batched_decoder, decode_batch
from data import IMAGE_EXTENSIONS, load_image, load_meta, normalise, read_filenames, read_image, read_labels
from evaluate import gather_by_index, shard
from runtime import (autocast, cleanup, default_device, device_arg, evaluating, exit_rank, fmt_time, held, model_device,
                     number, output_file, output_folder, setup)

MAGIC = b"CCAINDEX"
DATA_OFFSET = 64
VERSION = 1

# -----------------------------------------------------------------------------
# the index file


def weights_sha256(model):
    """The identity of a model: the SHA-256 of its weights (names, dtypes, shapes and bytes, in name order).
    The same weights give the same identity whichever file (best.pt, last.pt, a copy) they came from."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Index:
    """A gallery read from an index file. embeddings: (K, N, D) float16 np.memmap; paths: N paths; attributes: K
    names; values: K lists of value names; labels: (N, K) int64 value indices, -1 unknown, or None; failed: the
    [path, reason] of each image left out; checkpoint: {"sha256", "config"}."""

    def __init__(self, path, header, embeddings):
        self.path, self.header, self.embeddings = path, header, embeddings
        self.paths, self.attributes, self.values = header["paths"], header["attributes"], header["values"]
        self.labels = None if header["labels"] is None else np.array(header["labels"], dtype=np.int64).reshape(-1, len(self.attributes))
        self.failed, self.checkpoint = header["failed"], header["checkpoint"]
        self._on_device = {}  # (attribute, device) -> the (N, D) block, kept for repeated queries on a GPU

    def __len__(self):
        return len(self.paths)

    def block(self, a, device):
        """Attribute a's (N, D) float16 vectors as a tensor on `device` (a view of the file on the CPU)."""
        if device.type == "cpu":
            return torch.from_numpy(self.embeddings[a])
        if (a, device) not in self._on_device:
            self._on_device[a, device] = torch.from_numpy(np.ascontiguousarray(self.embeddings[a])).to(device)
        return self._on_device[a, device]

    def value_name(self, i, a):
        """The value name of gallery item i under attribute a, or None when unknown."""
        if self.labels is None or self.labels[i, a] < 0:
            return None
        return self.values[a][self.labels[i, a]]


def read_index(path):
    """An Index from `path`, the embeddings memory-mapped (nothing read until a query touches them)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            f.seek(max(0, size - 16))
            tail = f.read(16)
            if head != MAGIC or len(tail) < 16 or tail[8:] != MAGIC:
                raise ValueError(f"{path}: not a search.py index, or truncated (no {MAGIC.decode()} marks at both ends)")
            (n_header,) = struct.unpack("<Q", tail[:8])
            if n_header > size - 16 - DATA_OFFSET:
                raise ValueError(f"{path}: corrupt index (a header of {n_header} bytes in a file of {size})")
            f.seek(size - 16 - n_header)
            header = json.loads(f.read(n_header).decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"index not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt index header: {e}") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        version = header.get("version") if isinstance(header, dict) else None
        raise ValueError(f"{path}: index version {version}, this search.py reads version {VERSION}")
    check_header(path, header)
    K, N, D = header["shape"]
    if DATA_OFFSET + 2 * K * N * D + n_header + 16 != size:
        raise ValueError(f"{path}: corrupt index: {size} bytes, the header describes {K} x {N} x {D} float16 vectors")
    if N == 0:
        raise ValueError(f"{path}: the gallery is empty")
    # mode "c" (copy on write): writable as far as torch.from_numpy is concerned, and never written back
    embeddings = np.memmap(path, dtype="<f2", mode="c", offset=DATA_OFFSET, shape=(K, N, D))
    return Index(path, header, embeddings)


def _new_file(path, K, N, D, filled=None):
    """Start an index file at `path`: the leading mark, then room for (K, N, D) float16 vectors; returns them
    memory-mapped for writing. The first `filled` attributes' blocks (default all K) are allocated on disk now, so
    that a full disk is an OSError here, not a SIGBUS when the mapping is written; the rest stay holes."""
    filled = K if filled is None else filled
    with open(path, "wb") as f:
        f.write(MAGIC.ljust(DATA_OFFSET, b"\0"))
        f.truncate(DATA_OFFSET + 2 * K * N * D)
        try:
            os.posix_fallocate(f.fileno(), DATA_OFFSET, 2 * filled * N * D)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                os.remove(path)
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
                raise OSError(f"{path}: no room for the index: it needs {2 * filled * N * D / 2**20:,.0f} MiB, "
                              f"{free / 2**20:,.0f} MiB are free") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: written as mapped
                raise
    return np.memmap(path, dtype="<f2", mode="r+", offset=DATA_OFFSET, shape=(K, N, D))


def _header(D, paths, attributes, values, labels=None, failed=(), checkpoint=None, img_size=0):
    """The index's JSON header (the layout in this file's docstring)."""
    return dict(version=VERSION, shape=[len(attributes), len(paths), D], dtype="float16", paths=list(paths),
                attributes=list(attributes), values=[list(v) for v in values],
                labels=None if labels is None else np.asarray(labels).tolist(), failed=[list(x) for x in failed],
                checkpoint=checkpoint or dict(sha256=None, config={}), img_size=img_size)


@contextlib.contextmanager
def removed_on_error(path):
    """Inside the block, any exception (KeyboardInterrupt too) removes the file at `path` on its way out."""
    try:
        yield
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise


def _tmp_name(out):
    """A temporary name beside `out` that no other process writing `out` at the same time shares."""
    return f"{out}.{os.getpid()}.tmp"


def check_header(path, header):
    """Refuse, naming the file, a header that lacks a field or whose fields disagree with each other: an index may
    come from someone else, and a query must not fail deep inside with a KeyError or an IndexError."""
    missing = [k for k in ("shape", "paths", "attributes", "values", "labels", "failed", "checkpoint") if k not in header]
    if missing:
        raise ValueError(f"{path}: corrupt index header: no {', '.join(missing)}")
    shape, paths, attrs, values, labels = (header[k] for k in ("shape", "paths", "attributes", "values", "labels"))
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(x, int) and x >= 0 for x in shape)):
        raise ValueError(f"{path}: corrupt index header: shape {shape!r} is not [K, N, D]")
    K, N, D = shape
    if not (isinstance(paths, list) and len(paths) == N and isinstance(attrs, list) and len(attrs) == K
            and isinstance(values, list) and len(values) == K and all(isinstance(v, list) for v in values)):
        raise ValueError(f"{path}: corrupt index header: shape {shape} does not match its paths, attributes and value "
                         "lists")
    if labels is not None:
        try:
            rows = np.array(labels)
        except ValueError:  # ragged rows
            rows = np.zeros((0,))
        counts = np.array([len(v) for v in values], dtype=np.int64)
        if rows.shape != (N, K) or (N and rows.dtype.kind != "i") or (N and ((rows < -1) | (rows >= counts)).any()):
            raise ValueError(f"{path}: corrupt index header: its labels are not one value index (or -1) per image "
                             f"and attribute of its {N} images and {K} attributes")
    if not isinstance(header["checkpoint"], dict) or "sha256" not in header["checkpoint"]:
        raise ValueError(f"{path}: corrupt index header: no checkpoint identity (sha256)")


def _finish_file(tmp, out, header, n_rows, keep):
    """Compact the (K, n_rows, D) embeddings of `tmp` to the rows `keep` (in place: every row moves towards the
    start), append the header and the trailer, and rename tmp to out."""
    K, N, D = header["shape"]
    if N < n_rows:
        flat = np.memmap(tmp, dtype="<f2", mode="r+", offset=DATA_OFFSET, shape=(K * n_rows, D))
        w = 0
        for k in range(K):
            for s in range(0, N, 65536):
                src = k * n_rows + keep[s:s + 65536]
                flat[w:w + len(src)] = flat[src]  # the fancy index copies first; destinations never pass later sources
                w += len(src)
        flat.flush()
        del flat
    blob = json.dumps(header, ensure_ascii=False).encode("utf-8")
    with open(tmp, "r+b") as f:
        f.truncate(DATA_OFFSET + 2 * K * N * D)
        f.seek(0, os.SEEK_END)
        f.write(blob)
        f.write(struct.pack("<Q", len(blob)) + MAGIC)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def write_index(out, embeddings, paths, attributes, values, labels=None, checkpoint=None, failed=(), img_size=0):
    """Write embeddings (K, N, D) made elsewhere (or by hand) as an index file; return it read back.
    checkpoint: {"sha256", "config"} of the model that made them (weights_sha256), or None."""
    e = np.asarray(embeddings, dtype="<f2")
    K, N, D = e.shape
    if len(paths) != N or len(attributes) != K or len(values) != K:
        raise ValueError(f"embeddings {e.shape} need N = {N} paths and K = {K} attributes and value lists, got "
                         f"{len(paths)}, {len(attributes)}, {len(values)}")
    tmp = _tmp_name(out)
    with removed_on_error(tmp):
        emb = _new_file(tmp, K, N, D)
        emb[:] = e
        emb.flush()
        del emb
        _finish_file(tmp, out, _header(D, paths, attributes, values, labels, failed, checkpoint, img_size), N, np.arange(N))
    return read_index(out)

# -----------------------------------------------------------------------------
# building an index


class ImageList(torch.utils.data.Dataset):
    """(uint8 image, index, error): an image that cannot be read comes back as zeros with the reason, never raises.
    uint8 is a quarter of float32's bytes to hand from a loader worker; build_index normalises on the device."""

    def __init__(self, paths, img_size):
        self.paths, self.img_size = paths, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return read_image(self.paths[i], self.img_size), i, ""
        except Exception as e:  # missing, truncated, not an image: data.read_image names the file
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), i, str(e)


@torch.no_grad()
def build_index(model, paths, out, meta, labels=None, batch_size=64, workers=2, rank=0, world_size=1, log=print,
                log_every=10.0, decoder=None):
    """Embed every image of `paths` under every condition (model.embed_all: the trunk once per image) and write the
    index file `out`; return it read back (on every rank). meta: the checkpoint's meta (attribute and value names);
    labels: (N, K) value indices, -1 unknown, or None. Under torchrun each rank embeds every world_size-th image
    of each step's window and rank 0 writes the gathered window, so memory stays at one window whatever N is.
    On a GPU under bf16 autocast, as evaluate.py embeds. Images that cannot be read are left out and listed in
    the index (Index.failed) and by `log`; raises ValueError if none can be read. decoder: decode.batched_decoder()'s
    to decode each batch's JPEGs on the model's device (workers then only read bytes), or None: pillow in the workers."""
    n, K, D, S = len(paths), model.cfg.num_conditions, model.cfg.out_dim, model.cfg.img_size
    if n == 0:
        raise ValueError(f"{out}: no images to index: the gallery is empty")
    if len(meta["attributes"]) != K:
        raise ValueError(f"the model has {K} conditions, meta lists {len(meta['attributes'])} attributes")
    if labels is not None and np.shape(labels) != (n, K):
        raise ValueError(f"labels must be ({n}, {K}), one value index per image and attribute; got {np.shape(labels)}")
    device = model_device(model)
    identity = dict(sha256=weights_sha256(model), config=asdict(model.cfg))
    mine = shard(n, rank, world_size)
    if decoder is None:  # workers decode (pillow) and hand uint8 images
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ImageList(paths, S), mine), batch_size=batch_size,
                                             num_workers=workers, pin_memory=device.type == "cuda")
    else:  # workers read bytes; decode_batch decodes on the device
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(FileBytes(paths), mine), batch_size=batch_size,
                                             num_workers=workers, collate_fn=list)
    window = batch_size * world_size  # step j's batches hold the images j * window .. (j + 1) * window - 1
    steps = math.ceil(math.ceil(n / world_size) / batch_size)  # the same on every rank: the gathers pair up
    tmp = _tmp_name(out)
    with removed_on_error(tmp):  # an error or Ctrl-C while indexing leaves no temporary file
        if rank == 0:
            emb = _new_file(tmp, K, n, D)
        errors, batches = [], iter(loader)
        t0 = t_log = time.time()
        with evaluating(model):
            for step in range(steps):
                batch = next(batches, None)  # a rank whose shard is one image shorter may run out one step early
                if batch is not None:
                    images, idx, why = batch if decoder is None else decode_batch(batch, S, device, decoder)
                    with autocast(device):
                        e = model.embed_all(normalise(images.to(device, non_blocking=True)))  # (b, K, D), unit norm
                    e, idx = e.float().half().reshape(len(idx), K * D), idx.to(device)
                    errors += [(int(i), w) for i, w in zip(idx.tolist(), why) if w]
                else:
                    e, idx = torch.empty(0, K * D, dtype=torch.float16, device=device), torch.empty(0, dtype=torch.long, device=device)
                start = step * window
                m = min(window, n - start)
                g = gather_by_index(e, idx - start, m)  # (m, K * D) in image order
                if rank == 0:
                    emb[:, start:start + m] = g.view(m, K, D).transpose(0, 1).cpu().numpy()
                    now = time.time()
                    if now - t_log >= log_every or step + 1 == steps:
                        done = start + m
                        rate = done / (now - t0)
                        log(f"indexed {done}/{n} images, {rate:.1f} img/s, eta {fmt_time((n - done) / rate)}")
                        t_log = now
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, errors)
            errors = sorted(e for part in gathered for e in part)
        failed = [[paths[i], why] for i, why in sorted(errors)]
        if rank == 0:
            emb.flush()
            del emb
            bad = {i for i, _ in errors}
            keep = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
            if len(keep) == 0:
                os.remove(tmp)
            else:
                header = _header(D, [paths[i] for i in keep], meta["attributes"], meta["values"],
                                 None if labels is None else np.asarray(labels)[keep], failed, identity, S)
                _finish_file(tmp, out, header, n, keep)
            if failed:
                log(f"left out {len(failed)} of {n} images that could not be read:" + "".join(f"\n  {w}" for _, w in failed[:20])
                    + (f"\n  ... ({len(failed) - 20} more, all in the index's 'failed' list)" if len(failed) > 20 else ""))
    if len(failed) == n:
        raise ValueError(f"{out}: none of the {n} images could be read, e.g. {failed[0][1]}")
    if world_size > 1:
        dist.barrier()  # the file is in place before any rank reads it
    return read_index(out)


def gallery_paths(source):
    """The image paths of a folder (recursively, files with an image extension, sorted) or of a list file (one path
    a line; relative paths are relative to the list's folder)."""
    if os.path.isdir(source):
        found = sorted(os.path.join(d, f) for d, _, files in os.walk(source) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise ValueError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
        return found
    if os.path.isfile(source):
        base = os.path.dirname(source)
        try:
            found = [os.path.join(base, p) for p in read_filenames(source)]
        except UnicodeDecodeError:
            raise ValueError(f"{source}: not a text list of image paths (nor a folder)") from None
        if not found:
            raise ValueError(f"{source}: the list of images is empty")
        return found
    raise FileNotFoundError(f"gallery not found: {source} is neither a folder nor a list file")


def split_gallery(root, split, meta):
    """The images of a labelled ASEN-format split and their (N, K) value indices (-1 unknown): label_train.txt for
    train, the query and candidate lists for valid and test. The folder's attributes must be the checkpoint's."""
    disk = load_meta(meta["name"], root)
    if disk["attributes"] != meta["attributes"] or [len(v) for v in disk["values"]] != [len(v) for v in meta["values"]]:
        raise ValueError(f"{root}: attributes {disk['attributes']} differ from the checkpoint's {meta['attributes']}")
    names = read_filenames(os.path.join(root, f"filenames_{split}.txt"))
    lists = ["label_train.txt"] if split == "train" else [f"query_{split}.txt", f"candidate_{split}.txt"]
    labels = np.full((len(names), len(meta["attributes"])), -1, dtype=np.int64)
    for name in lists:
        rows = read_labels(os.path.join(root, name), len(names), disk, multi=split == "train")
        labels[rows[:, 0], rows[:, 1]] = rows[:, 2]
    return [os.path.normpath(os.path.join(root, n)) for n in names], labels

# -----------------------------------------------------------------------------
# querying


@torch.no_grad()
def embed_image(model, path):
    """(K, D) float32: one image under every condition, embedded as build_index embeds the gallery."""
    device = model_device(model)
    x = load_image(path, model.cfg.img_size)[None].to(device)
    with evaluating(model), autocast(device):
        return model.embed_all(x)[0].float().half().float()  # rounded to float16 like the gallery


def check_model(index, model, ckpt_path="the model"):
    """Refuse an index that another model built: its vectors are not comparable with this model's."""
    sha = weights_sha256(model)
    if sha != index.checkpoint["sha256"]:
        raise ValueError(f"{index.path} was built with another checkpoint (weights {index.checkpoint['sha256'][:12]}..., "
                         f"{ckpt_path} has {sha[:12]}...): index the gallery again with this checkpoint")


def attribute_indices(index, attrs):
    unknown = [a for a in attrs if a not in index.attributes]
    if unknown:
        raise ValueError(f"unknown attribute {unknown[0]!r}; the model knows: {', '.join(index.attributes)}")
    return [index.attributes.index(a) for a in attrs]


@torch.no_grad()
def query(index, embedding, attrs, weights=None, topk=10, exclude=(), device=None):
    """The topk gallery items by score = sum over attrs of weight x cos(query under a, item under a).

    embedding: (K, D) the query image under every condition (embed_image), or a model's embedding from elsewhere;
    attrs: attribute names; weights: one per attribute (default 1 each; negative ranks the opposite first);
    exclude: gallery indices left out (the query itself). The gallery's vectors are unit-norm up to float16
    rounding, so the dot products are the cosines. Ties: the lower gallery index first.
    Returns [{rank, index, path, score, cosines {attr: cos}, values {attr: value name or None}}].

    Two passes, because converting float16 to float32 is what costs on a CPU (a million 128-d vectors: about ten
    times the float16 product's time), not the product: (1) every item's score from float16 products (float32 sums, a float16 result: within
    2^-11 x |cos| <= 2^-10 of the float32 cosine, per attribute); (2) the items within twice that bound of the
    k-th best are scored again in float32. Every item of the exact top k is among them, so the result is the
    float32 ranking, at the first pass's speed."""
    ids = attribute_indices(index, attrs)
    weights = [1.0] * len(attrs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(attrs):
        raise ValueError(f"{len(weights)} weights for {len(attrs)} attributes: give one --weight per --attr, or none")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    device = torch.device(device or "cpu")
    K, N, D = index.embeddings.shape
    q = torch.nn.functional.normalize(torch.as_tensor(embedding, dtype=torch.float32).reshape(-1, D), dim=1).to(device)
    if q.shape[0] != K:
        raise ValueError(f"the query embedding has {q.shape[0]} conditions, the index {K}")
    coarse = torch.zeros(N, dtype=torch.float32, device=device)
    for a, w in zip(ids, weights):
        coarse += w * (index.block(a, device) @ q[a].half()).float()  # (N,)
    exclude = sorted(set(int(i) for i in exclude))
    if exclude:
        coarse[torch.tensor(exclude, device=device)] = -math.inf
    k = min(topk, N - len(exclude))
    if k < 1:
        return []
    kth = torch.topk(coarse, k).values[-1]
    cand = (coarse >= kth - 2 * 2**-10 * sum(abs(w) for w in weights)).nonzero().squeeze(1)  # ascending indices
    cos = torch.stack([index.block(a, device)[cand].float() @ q[a] for a in ids])  # (A, C) float32 cosines
    score = (torch.tensor(weights, device=device)[:, None] * cos).sum(0)  # (C,)
    order = torch.sort(score, descending=True, stable=True).indices[:k].cpu()  # stable: ties by gallery index
    cand, score, cos = cand.cpu(), score.cpu(), cos.cpu()
    return [dict(rank=r + 1, index=int(cand[j]), path=index.paths[cand[j]], score=float(score[j]),
                 cosines={name: float(cos[t, j]) for t, name in enumerate(attrs)},
                 values={name: index.value_name(int(cand[j]), a) for name, a in zip(attrs, ids)})
            for r, j in enumerate(order.tolist())]


def format_results(results, attrs):
    """A text table: rank, score, then the cosine and value name under each attribute, then the path."""
    head = f"{'rank':>4} {'score':>7}  " + "".join(f"{a[:21]:<22} {'cos':>6}  " for a in attrs) + "path"
    lines = [head]
    for r in results:
        cells = "".join(f"{(r['values'][a] or '?')[:21]:<22} {r['cosines'][a]:>6.3f}  " for a in attrs)
        lines.append(f"{r['rank']:>4} {r['score']:>7.4f}  {cells}{r['path']}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the query latency of a large gallery, with random vectors


def bench(num_images, num_attributes, out_dims, folder, queries=5, device=None):
    """Write an index of num_images random unit vectors per attribute (for each width of out_dims) and time
    query() under one and under two attributes. Only the attributes the queries use are filled; the others stay
    holes in a sparse file, which a query never reads (each attribute's vectors are contiguous)."""
    device = default_device(device)
    K, N = num_attributes, num_images
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"query latency: {N:,} images x {K} attributes, float16, on {name} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    rng = np.random.default_rng(0)
    for D in out_dims:
        path = os.path.join(folder, f"bench_{N}_{K}_{D}.{os.getpid()}.idx")
        t0 = time.time()
        try:  # a full disk (the header's write too) or Ctrl-C leaves no file behind
            emb = _new_file(path, K, N, D, filled=2)
            for a in range(2):
                for s in range(0, N, 1 << 16):
                    x = rng.standard_normal((min(1 << 16, N - s), D), dtype=np.float32)
                    emb[a, s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
            emb.flush()
            del emb
            header = _header(D, [f"images/{i:07d}.jpg" for i in range(N)], [f"attribute_{k}" for k in range(K)],
                             [[] for _ in range(K)], checkpoint=dict(sha256="random", config={}))
            _finish_file(path, path, header, N, np.arange(N))
            print(f"\nout_dim {D}: {2 * K * N * D / 2**20:,.0f} MiB of vectors ({2 * N * D / 2**20:,.0f} MiB per attribute), "
                  f"written in {time.time() - t0:.0f} s")
            t0 = time.perf_counter()
            index = read_index(path)
            print(f"  open the index (header with {N:,} paths):   {1e3 * (time.perf_counter() - t0):8.0f} ms")
            q = torch.nn.functional.normalize(torch.randn(K, D), dim=1)
            for attrs in (["attribute_0"], ["attribute_0", "attribute_1"]):
                times = []
                for i in range(queries + 1):  # the first reads the vectors from disk (or the page cache)
                    t0 = time.perf_counter()
                    query(index, q, attrs, topk=10, device=device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                warm = sorted(times[1:])[len(times[1:]) // 2]
                print(f"  query under {len(attrs)} attribute(s), top 10: first {1e3 * times[0]:8.0f} ms, then median "
                      f"{1e3 * warm:6.0f} ms ({N / warm / 1e6:.1f} M items/s)")
            del index
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

# -----------------------------------------------------------------------------
# command line


def load_model(path, device):
    model, ckpt = load_checkpoint(path, device)
    if model.cfg.num_conditions != len(ckpt["meta"]["attributes"]):
        raise ValueError(f"{path}: {model.cfg.num_conditions} conditions, its meta lists {len(ckpt['meta']['attributes'])} attributes")
    return model, ckpt


def run_index(args):
    rank, world, device = setup(args.device)
    finished = False
    try:
        output_file(args.out, "--out index")  # before the model loads or an image is read
        model, ckpt = load_model(args.ckpt, device)
        if args.images:
            paths, labels = gallery_paths(args.images), None
        else:
            if ckpt["meta"]["format"] != "asen":
                raise ValueError(f"{ckpt['meta']['name']}'s split files carry no value labels: index it with --images")
            paths, labels = split_gallery(args.data_root, args.split, ckpt["meta"])
        if rank == 0:
            print(f"indexing {len(paths)} images under {model.cfg.num_conditions} attributes with {args.ckpt} "
                  f"({model.cfg.arch}, {model.cfg.img_size} px, out_dim {model.cfg.out_dim}) on {world} x {device}", flush=True)
        decoder = batched_decoder() if args.decode == "batched" or args.decode == "auto" and device.type == "cuda" else None
        if args.decode == "batched" and decoder is None:
            raise ValueError("--decode batched needs TorchCodec or torchvision: pip install torchcodec")
        if rank == 0:
            print(f"decoding: {f'{decoder[0]} on {device}, in batches' if decoder else 'pillow in the loader workers'}", flush=True)
        t0 = time.time()
        with held(args.out + ".lock", args.out) if rank == 0 else contextlib.nullcontext():  # one live writer of --out
            index = build_index(model, paths, args.out, ckpt["meta"], labels, args.batch_size, args.workers, rank, world,
                                log=lambda s: print(s, flush=True), decoder=decoder)
        if rank == 0:
            t = time.time() - t0
            print(f"wrote {args.out}: {len(index)} images x {model.cfg.num_conditions} attributes x {model.cfg.out_dim} "
                  f"in {fmt_time(t)} ({len(paths) / t:.1f} img/s); {len(index.failed)} left out")
        finished = True
    finally:
        cleanup(finished)


def run_query(args):
    device = torch.device(args.device or "cpu")
    if args.out:
        output_file(args.out, "--out picture")
    index = read_index(args.index)
    attribute_indices(index, args.attr)  # an unknown name fails before the model loads
    model, _ = load_model(args.ckpt, device)
    check_model(index, model, args.ckpt)
    emb = embed_image(model, args.image)
    me, base = os.path.realpath(args.image), os.path.basename(args.image)
    # the query is not its own result (same file: same name first, a cheap filter for a million paths)
    exclude = [i for i, p in enumerate(index.paths) if os.path.basename(p) == base and os.path.realpath(p) == me]
    results = query(index, emb, args.attr, args.weight, args.topk, exclude, device)
    query_values = ({a: index.value_name(exclude[0], index.attributes.index(a)) for a in args.attr} if exclude
                    else {a: None for a in args.attr})
    if args.out:
        import visualize

        visualize.search_figure(args.image, results, args.attr, args.weight, model.cfg.img_size, args.out, query_values)
    if args.json:
        print(json.dumps(dict(query=args.image, attributes=args.attr, weights=args.weight or [1.0] * len(args.attr),
                              query_values=query_values, index=args.index, results=results, picture=args.out), indent=1))
        return
    w = args.weight or [1.0] * len(args.attr)
    print(f"query {args.image} under " + " + ".join(f"{x:g} x {a}" for a, x in zip(args.attr, w))
          + (f" (it is gallery item {exclude[0]}, left out; its values: "
             + ", ".join(f"{a} = {v or '?'}" for a, v in query_values.items()) + ")" if exclude else "")
          + f"; {len(index)} gallery images in {args.index}")
    print(format_results(results, args.attr))
    if args.out:
        print("wrote", args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("index", help="embed a gallery under every attribute into an index file")
    q.add_argument("--ckpt", required=True, help="a best.pt or last.pt written by train.py")
    q.add_argument("--images", default=None, help="a folder (searched recursively) or a list file (one path a line, relative to the list's folder)")
    q.add_argument("--data-root", default=None, help="or: a labelled ASEN-format folder (dataset_tools.py import writes one) ...")
    q.add_argument("--split", default="test", choices=("train", "valid", "test"), help="... and its split, whose value names query shows")
    q.add_argument("--out", required=True, help="the index file to write")
    q.add_argument("--batch-size", type=number(int, 1), default=64, help="images per batch per rank")
    q.add_argument("--workers", type=number(int, 0), default=4, help="image-decoding processes per rank")
    q.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    q.add_argument("--decode", choices=("auto", "batched", "pillow"), default="auto",
                   help="batched: workers read bytes and the model's device decodes each batch's JPEGs (nvJPEG on a GPU; "
                        "needs TorchCodec or torchvision); pillow: workers decode; auto (default): batched on a GPU when a "
                        "decoder is installed")
    q = sub.add_parser("query", help="rank an index's images by similarity to a query image under attributes")
    q.add_argument("--index", required=True, help="an index file written by 'search.py index'")
    q.add_argument("--ckpt", required=True, help="the checkpoint the index was built with")
    q.add_argument("--image", required=True, help="the query image (any file)")
    q.add_argument("--attr", action="append", required=True, help="an attribute name; repeat for several")
    q.add_argument("--weight", action="append", type=float, default=None, help="the weight of each --attr, in order (default 1 each)")
    q.add_argument("--topk", type=number(int, 1), default=10, help="results to show")
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    q.add_argument("--out", default=None, help="draw the query and its results into this PNG")
    q.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cpu: the index is read from its file)")
    q = sub.add_parser("bench", help="query latency against a large gallery of random vectors")
    q.add_argument("--num-images", type=number(int, 10), default=1_000_000, help="gallery size N (at least the top 10 shown)")
    q.add_argument("--num-attributes", type=number(int, 2), default=8, help="K (at least the 2 that a query combines)")
    q.add_argument("--out-dim", type=number(int, 1), nargs="+", default=[128, 1024], help="embedding widths to measure")
    q.add_argument("--queries", type=number(int, 1), default=5, help="timed queries after the first")
    q.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary index files go (deleted after)")
    q.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.command == "index" and bool(args.images) == bool(args.data_root):
        p.error("give the gallery as --images DIR_OR_LIST, or as --data-root DIR [--split S]")
    try:
        if args.command == "index":
            run_index(args)
        elif args.command == "query":
            run_query(args)
        else:
            bench(args.num_images, args.num_attributes, args.out_dim, output_folder(args.dir, "--dir"), args.queries,
                  args.device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    exit_rank(main)  # under torchrun: os._exit after main, never the interpreter's finalization (runtime.exit_rank)

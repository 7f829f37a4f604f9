"""
Batched image decoding on the model's device: loader workers only read each file's bytes, and the JPEGs of a batch
are decoded together where the model runs (nvJPEG on a GPU), then resized and centre-cropped there as
data.read_image does on the CPU. The decoder is TorchCodec's decode_jpeg when TorchCodec is installed (torchvision
0.29 deprecates its own image decoding in its favour), else torchvision's; with neither, callers keep pillow.
Whatever the batched decoder does not take (PNG and other formats, CMYK JPEGs, a file it fails on) is read by
data.read_image instead, that image alone; an image nothing can read comes back as zeros with the reason.

    loader = DataLoader(FileBytes(paths), batch_size=64, num_workers=4, collate_fn=list)
    for items in loader:
        images, idx, why = decode_batch(items, S, device, batched_decoder())   # uint8 (b, 3, S, S) on device

Against read_image the crops differ a little: pillow decodes a large JPEG at 1/2, 1/4 or 1/8 scale (draft mode)
before its resize, the batched decoder at full scale before an antialiased resize, and nvJPEG's IDCT rounds apart
from libjpeg's. Measured with torchvision's CPU decoder (docs/LOG.md, 2026-12-02): a mean absolute difference of
0.1-0.7 levels of 255 per image at 224 px from 300-640 px JPEGs, and up to 5.6 where pillow's reduced scale lands
on S itself (a 64 px JPEG to 32 px). MEAN_BOUND is the bound the tests check, on the CPU and on a GPU.
"""
import warnings

import torch
import torch.nn.functional as F

from data import read_image, resize_plan

MEAN_BOUND = 6.0  # levels of 255: the largest mean |batched - read_image| of one image that the tests allow


def batched_decoder():
    """(name, decode(list of uint8 byte tensors, device) -> list of (3, H, W) uint8) of the batched JPEG decoder
    installed here: TorchCodec's, else torchvision's; None when neither is."""
    try:
        from torchcodec.decoders import decode_jpeg as codec_jpeg
        return "TorchCodec", lambda data, device: codec_jpeg(data, mode="RGB", device=device)
    except Exception:  # not installed, or its libraries do not load
        pass
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:
        return None

    def decode(data, device):
        with warnings.catch_warnings():  # 0.29 warns that its decoders move to TorchCodec
            warnings.simplefilter("ignore")
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return "torchvision", decode


def jpeg_components(data):
    """The number of colour components of a baseline or progressive JPEG's frame (1 grey, 3 YCbCr, 4 CMYK or YCCK),
    from its SOF marker; None when `data` is not a JPEG whose frame header can be found."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame (not DHT, JPG, DAC)
            return data[i + 9] if i + 9 < len(data) else None
        if marker == 0xD9 or length < 2:  # the end of the image, or a broken segment, before any frame
            return None
        i += 2 + length
    return None


class FileBytes(torch.utils.data.Dataset):
    """(path, index, bytes as a uint8 tensor or None, why it is None): what a loader worker reads for decode_batch.
    The bytes are None for a file the batched decoder is not given (not a 1- or 3-component JPEG, or unreadable)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return path, i, None, f"image not found: {path}" if isinstance(e, FileNotFoundError) else f"cannot read image {path}: {e}"
        if jpeg_components(data[:65536]) not in (1, 3):  # PNG, CMYK, not an image: read_image's, in decode_batch
            return path, i, None, ""
        return path, i, torch.frombuffer(bytearray(data), dtype=torch.uint8), ""


def resize_crop(image, img_size):
    """(3, H, W) uint8 -> (3, S, S) uint8 on its device, by read_image's plan (data.resize_plan): the short side to S,
    bilinear and antialiased as pillow's resize, then the centre crop."""
    size, (left, top) = resize_plan(image.shape[2], image.shape[1], img_size)
    if size:
        x = F.interpolate(image[None].float(), size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)
        image = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return image[:, top:top + img_size, left:left + img_size]


def decode_batch(items, img_size, device, decoder):
    """FileBytes items -> (uint8 (b, 3, S, S) on `device`, (b,) indices, b reasons, "" for the images read). The
    JPEGs are decoded in one call of `decoder` (batched_decoder()); when that call fails (one corrupt image fails
    the batch) each is tried alone, and what still fails, with the files it was not given, goes to read_image."""
    device = torch.device(device)
    jpegs = [k for k, item in enumerate(items) if item[2] is not None]
    decoded = {}
    if jpegs:
        try:
            decoded = dict(zip(jpegs, decoder[1]([items[k][2] for k in jpegs], device)))
        except Exception:
            for k in jpegs:
                try:
                    decoded[k] = decoder[1]([items[k][2]], device)[0]
                except Exception:  # read_image below says what is wrong with it
                    pass
    images = torch.zeros(len(items), 3, img_size, img_size, dtype=torch.uint8, device=device)
    why = []
    for k, (path, _, data, reason) in enumerate(items):
        if k in decoded and decoded[k].shape[0] == 3:
            images[k] = resize_crop(decoded[k], img_size)
            reason = ""
        elif not reason:
            try:
                images[k] = read_image(path, img_size).to(device)
            except Exception as e:  # missing, truncated, not an image: read_image names the file
                reason = str(e)
        why.append(reason)
    return images, torch.tensor([item[1] for item in items]), why

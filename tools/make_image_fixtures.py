#!/usr/bin/env python3
"""Writes the image-preprocessing goldens for tests/data/image_test.cpp.

Reference = Pillow decode + HF's PIL-backed CLIP/LLaVA image processors (the slow path that LLaVA-1.5 used), with
an independent direct-PIL implementation of LLaVA's expand2square + CLIP arithmetic (LLAVA.md §3.2-§3.3) asserted
equal to it. Outputs (all under tests/data/images/):
  * small synthetic test images (gray/RGBA/palette/BMP/1x1/tall PNG, a truncated JPEG, a text file named .png);
  * golden_pixels.safetensors: decoded uint8 HWC pixels, resize goldens, uint8 intermediates after pad/resize/crop
    and float32 CHW outputs (full 336 px as a sha256 + sum in the metadata, reduced sizes stored in full).
Usage: .venv/bin/python tools/make_image_fixtures.py [--shared /work/shared/data]
The real photographs (chelsea.png, extreme_ironing.jpg) are copied by hand; see tests/data/SOURCES.md.
"""
import argparse
import hashlib
import io
import os
import warnings

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "images")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 0.00392156862745098


def hf_processor(size, pad):
    """HF's PIL-backed processor (transformers >= 5 names it *Pil; older ones need use_fast=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers import LlavaImageProcessorPil as Proc
        except ImportError:  # transformers 4.x: the slow LlavaImageProcessor is the PIL path
            from transformers import LlavaImageProcessor as Proc
        return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=pad,
                    image_mean=list(MEAN), image_std=list(STD), resample=3, do_convert_rgb=True)


def expand2square(img, bg):
    """LLaVA mm_utils.expand2square."""
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), bg)
        out.paste(img, (0, (w - h) // 2))
        return out
    out = Image.new(img.mode, (h, h), bg)
    out.paste(img, ((h - w) // 2, 0))
    return out


def direct(img, size, pad):
    """Returns (uint8 HWC after pad/resize/crop, float32 CHW), the CLIPImageProcessor slow-path arithmetic."""
    img = img.convert("RGB")
    if pad:
        img = expand2square(img, tuple(int(m * 255) for m in MEAN))
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    ow, oh = (size, new_long) if w <= h else (new_long, size)
    if (ow, oh) != (w, h):
        img = img.resize((ow, oh), resample=Image.BICUBIC, reducing_gap=None)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    a = a[top:top + size, left:left + size]
    x = (a.astype(np.float64) * RESCALE).astype(np.float32)
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return np.ascontiguousarray(a), np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img, size, pad):
    u8, f32 = direct(img, size, pad)
    ref = np.asarray(hf_processor(size, pad)(img, return_tensors="np")["pixel_values"][0], dtype=np.float32)
    assert ref.shape == f32.shape and np.array_equal(ref, f32), "direct PIL path disagrees with HF's processor"
    return u8, f32


def synthetic_images(rng):
    """Small lossless images for the decoder (bit-exact vs Pillow) and the odd-shape preprocessing paths."""
    yy, xx = np.mgrid[0:17, 0:23]
    gray = ((xx * 11 + yy * 7) % 256).astype(np.uint8)
    rgba = rng.integers(0, 256, size=(13, 19, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 19, dtype=np.uint8)[None, :]  # alpha must be dropped, not composited
    pal = Image.fromarray(rng.integers(0, 256, size=(11, 17, 3), dtype=np.uint8)).quantize(colors=16)
    bmp = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    # Tall with an odd surplus (52 - 31 = 21): padding puts 10 columns left, 11 right. Smooth plus hard edges so
    # resize overshoot and the uint8 clamp both occur.
    ty, tx = np.mgrid[0:52, 0:31]
    tall = np.stack([(tx * 8) % 256, (ty * 5) % 256, np.where((tx // 4 + ty // 4) % 2 == 0, 250, 5)], -1)
    files = {
        "gray.png": (Image.fromarray(gray, "L"), "PNG"),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.gif": (pal, "GIF"),
        "image.bmp": (Image.fromarray(bmp, "RGB"), "BMP"),
        "one_px.png": (Image.fromarray(np.array([[[200, 10, 30]]], dtype=np.uint8), "RGB"), "PNG"),
        "tall.png": (Image.fromarray(tall.astype(np.uint8), "RGB"), "PNG"),
    }
    for name, (img, fmt) in files.items():
        img.save(os.path.join(OUT, name), format=fmt)
    # A JPEG cut in the middle of its entropy-coded data, and a text file with an image extension.
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    with open(os.path.join(OUT, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(OUT, "not_image.png"), "w") as f:
        f.write("this is a text file, not a PNG\n")
    return list(files)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(1234)
    t, meta = {}, {}

    for name in synthetic_images(rng):
        t[f"decode/{name}"] = np.ascontiguousarray(np.asarray(Image.open(os.path.join(OUT, name)).convert("RGB")))
    tall = Image.open(os.path.join(OUT, "tall.png"))
    for mode in ("pad", "crop"):
        u8, f32 = preprocess(tall, 32, mode == "pad")
        t[f"tall/{mode}/u8"], t[f"tall/{mode}/f32"] = u8, f32
    u8, f32 = preprocess(Image.open(os.path.join(OUT, "one_px.png")), 24, True)
    t["one_px/pad/f32"] = f32

    # Resize goldens: a 37x23 source with noise and hard edges, up/down/mixed/one-axis targets.
    src = rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)
    src[:, 18:] = np.where(src[:, 18:] > 128, 255, 0)
    t["resize/src"] = src
    for w, h in [(80, 50), (11, 7), (29, 41), (37, 60), (100, 23), (5, 3), (1, 1), (2, 23)]:
        t[f"resize/{w}x{h}"] = np.asarray(Image.fromarray(src).resize((w, h), Image.BICUBIC, reducing_gap=None))

    photos = {"chelsea": "chelsea.png", "ironing": "extreme_ironing.jpg"}
    for key, fname in photos.items():
        img = Image.open(os.path.join(OUT, fname))
        img.load()
        if key == "chelsea":  # a strong downscale (x4.6: 19-tap kernels) of a real photo
            t["resize/chelsea_97x65"] = np.asarray(img.convert("RGB").resize((97, 65), Image.BICUBIC,
                                                                              reducing_gap=None))
        for mode in ("pad", "crop"):
            u8, f32 = preprocess(img, 336, mode == "pad")
            if key == "chelsea" or mode == "pad":  # the 336x336 uint8 just before rescale (size budget: < 2 MB)
                t[f"{key}/{mode}/u8"] = u8
            meta[f"{key}/{mode}/f32_sha256"] = hashlib.sha256(f32.tobytes()).hexdigest()
            meta[f"{key}/{mode}/f32_sum"] = repr(float(f32.astype(np.float64).sum()))
            # Full float output at a reduced size (same code path, 9x smaller).
            t[f"{key}/{mode}/f32_112"] = preprocess(img, 112, mode == "pad")[1]
        print(key, {k: v for k, v in meta.items() if k.startswith(key)})

    meta["generator"] = "tools/make_image_fixtures.py"
    meta["pillow"] = PIL.__version__
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, os.path.join(OUT, "golden_pixels.safetensors"),
              metadata=meta)
    for f in os.listdir(OUT):
        os.chmod(os.path.join(OUT, f), 0o644)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(t)} tensors; tests/data/images is {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""LLaVA-NeXT anyres goldens (tests/data/images/anyres/, anyres_test in tests/data/image_test.cpp).

HF's LlavaNextImageProcessorPil (transformers 5.24.0, Pillow 13.0.0) on synthetic PNGs of several aspect ratios,
including the extreme 10:1 and 1:10, at a reduced scale so the goldens stay small: patch/crop 32 px and LLaVA-NeXT's
pinpoints divided by 10.5 (336 -> 32): [[32,64],[64,32],[64,64],[96,32],[32,96]]. The algorithm has no size-dependent
branch, so this exercises exactly the code that runs at 336. golden.safetensors: pixel_values [N,3,32,32] float32
per image, and its image_sizes; golden.json: the chosen grid per image.
usage: .venv/bin/python tools/make_anyres_fixture.py
"""
import json
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.image_processing_utils import select_best_resolution

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "images", "anyres")
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SIZES = {"square": (40, 40), "wide5x3": (50, 30), "tall3x5": (30, 50), "wide10x1": (200, 20), "tall1x10": (20, 200),
         "small": (9, 13), "big": (130, 70)}


def main():
    os.makedirs(OUT, exist_ok=True)
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=PINPOINTS, resample=3, do_pad=False)
    t, meta = {}, {"pinpoints": PINPOINTS, "images": {}}
    for name, (w, h) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * 13 + yy * 3) % 256, (yy * 9) % 256, np.where((xx // 3 + yy // 3) % 2 == 0, 240, 15)], -1)
        path = os.path.join(OUT, name + ".png")
        Image.fromarray(a.astype(np.uint8), "RGB").save(path)
        img = Image.open(path)
        out = proc(img, return_tensors="np")
        pv = np.asarray(out["pixel_values"][0], dtype=np.float32)
        t[name] = np.ascontiguousarray(pv)
        best = select_best_resolution((h, w), PINPOINTS)
        meta["images"][name] = {"width": w, "height": h, "best_resolution": list(best), "patches": int(pv.shape[0])}
    save_file(t, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta["images"]))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Images that Pillow reads its own way, and the pixels it gives (tests/data/images/edge/, image_test.cpp).

  gray16.png      16-bit grayscale PNG: Pillow opens it as I;16 and convert("RGB") clips every value above 255 to
                  255 (it does not scale by 1/257 or take the high byte);
  transparent.gif a palette GIF with a transparent index: convert("RGB") gives that index's palette colour, not black;
  panorama.png    3000 x 40: through the llava-hf crop path (shortest edge 336 -> 25200 x 336, centre crop 336)
                  Pillow and HF's processor handle it; the uint8 crop is the golden;
  cmyk.jpg        a CMYK JPEG: Pillow inverts it (Adobe's convention, "CMYK;I") and converts nk - c*nk/255.
golden.safetensors holds the uint8 HWC pixels of each. Usage: .venv/bin/python tools/make_image_edge_fixtures.py
(Pillow 13.0.0, numpy, safetensors; transformers only to cross-check the crop against HF's processor).
"""
import importlib.util
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "images", "edge")


def main():
    os.makedirs(OUT, exist_ok=True)
    golden = {}

    # 16-bit gray: values on both sides of 255, and the extremes.
    vals = np.array([0, 1, 100, 254, 255, 256, 300, 1000, 4095, 32768, 65534, 65535], dtype=np.uint16)
    g16 = np.resize(vals, (6, 8)).astype(np.uint16)
    g16[5, 7] = 65535
    Image.fromarray(g16).save(os.path.join(OUT, "gray16.png"))  # uint16 -> mode I;16
    img = Image.open(os.path.join(OUT, "gray16.png"))
    assert img.mode in ("I;16", "I"), img.mode
    golden["gray16"] = np.asarray(img.convert("RGB"))

    # Palette GIF, index 3 transparent with a colour that is not black.
    idx = (np.arange(6 * 5).reshape(5, 6) % 6).astype(np.uint8)
    p = Image.fromarray(idx, mode="P")
    pal = [0, 0, 0, 255, 0, 0, 0, 255, 0, 200, 50, 10, 0, 0, 255, 255, 255, 255]
    p.putpalette(pal + [0] * (768 - len(pal)))
    p.save(os.path.join(OUT, "transparent.gif"), transparency=3)
    img = Image.open(os.path.join(OUT, "transparent.gif"))
    assert img.info.get("transparency") == 3
    golden["transparent"] = np.asarray(img.convert("RGB"))
    assert tuple(golden["transparent"][0, 3]) == (200, 50, 10)

    # 3000 x 40 panorama: smooth bands plus a checker, so the resize and the crop both matter.
    yy, xx = np.mgrid[0:40, 0:3000]
    pano = np.stack([(xx // 3) % 256, (yy * 6) % 256, np.where((xx // 7 + yy // 5) % 2 == 0, 230, 20)], -1)
    Image.fromarray(pano.astype(np.uint8), "RGB").save(os.path.join(OUT, "panorama.png"))
    spec = importlib.util.spec_from_file_location("mif", os.path.join(HERE, "make_image_fixtures.py"))
    mif = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mif)
    u8, _ = mif.preprocess(Image.open(os.path.join(OUT, "panorama.png")), 336, pad=False)  # asserts HF agrees
    golden["panorama_crop336"] = u8

    # CMYK JPEG (Pillow writes Adobe's inverted convention): Pillow decodes it as "CMYK;I" and converts with
    # nk - c * nk / 255 (its MULDIV255 rounding), not OpenCV's formula.
    yy, xx = np.mgrid[0:24, 0:32]
    cmyk = np.stack([(xx * 8) % 256, (yy * 10) % 256, ((xx + yy) * 5) % 256, ((xx * yy) % 7) * 30], -1)
    Image.fromarray(cmyk.astype(np.uint8), "CMYK").save(os.path.join(OUT, "cmyk.jpg"), "JPEG", quality=95)
    img = Image.open(os.path.join(OUT, "cmyk.jpg"))
    assert img.mode == "CMYK"
    golden["cmyk"] = np.asarray(img.convert("RGB"))

    save_file({k: np.ascontiguousarray(v) for k, v in golden.items()}, os.path.join(OUT, "golden.safetensors"))
    print({k: v.shape for k, v in golden.items()})


if __name__ == "__main__":
    main()

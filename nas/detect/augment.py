"""Detection augmentations on RGB uint8 arrays (H, W, 3) with pixel boxes (n, 5) = cls, x1, y1, x2, y2.

Letterbox, random affine, horizontal flip, HSV jitter and 4-image mosaic; numpy + Pillow only, and every random
choice comes from the `numpy.random.Generator` passed in, so a sample is reproducible from its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from nas.config import check_keys, read, require_mapping

FILL = 114  # grey used for padding and for areas an affine warp uncovers (the YOLO convention)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; names and defaults as in ultralytics' hyper-parameters (mosaic: a Dataset argument)."""
    hsv_h: float = 0.015     # hue shift, fraction of the colour circle
    hsv_s: float = 0.7       # saturation gain range (1 ± hsv_s)
    hsv_v: float = 0.4       # value gain range (1 ± hsv_v)
    degrees: float = 0.0     # rotation range (±degrees)
    translate: float = 0.1   # shift range, fraction of the output size
    scale: float = 0.5       # zoom range (1 ± scale)
    shear: float = 0.0       # shear range (±degrees)
    fliplr: float = 0.5      # probability of a horizontal flip

    @classmethod
    def from_mapping(cls, obj: Any, source: str = "<hyp>", field: str | None = None) -> "AugmentConfig":
        """Build from a dict (e.g. a YAML section); unknown keys and bad values give a ConfigError."""
        obj = require_mapping(obj, source, field)
        names = [f.name for f in fields(cls)]
        check_keys(obj, names, source, field)
        bounded = {"scale": 0.99, "fliplr": 1.0, "translate": 0.5, "hsv_h": 0.5, "hsv_s": 1.0, "hsv_v": 1.0,
                   "degrees": 180.0, "shear": 89.0}
        kwargs = {}
        for name in obj:
            hi = bounded[name]
            kwargs[name] = read(obj, name, float, source, field,
                                check=lambda v, hi=hi: None if 0.0 <= v <= hi else f"must be in [0, {hi}]")
        return cls(**kwargs)


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize (Pillow antialiases when shrinking)."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def fit_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling so that the long side equals `size`, keeping the aspect ratio."""
    r = size / max(height, width)
    return max(1, round(height * r)), max(1, round(width * r))


def scale_boxes(boxes: np.ndarray, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    out = boxes.astype(np.float32, copy=True)
    out[:, [1, 3]] = out[:, [1, 3]] * sx + dx
    out[:, [2, 4]] = out[:, [2, 4]] * sy + dy
    return out


@dataclass(frozen=True)
class Letterbox:
    """How an original image maps into the letterboxed square: x_out = x * sx + pad_x (same for y)."""
    sx: float
    sy: float
    pad_x: int
    pad_y: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Inverse mapping for (n, 5) pixel boxes, e.g. predictions back to the original image."""
        return scale_boxes(boxes, 1 / self.sx, 1 / self.sy, -self.pad_x / self.sx, -self.pad_y / self.sy)


def letterbox(img: np.ndarray, boxes: np.ndarray, size: int, fill: int = FILL
              ) -> tuple[np.ndarray, np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio so the long side is `size`, centre on a `size`x`size` grey square."""
    h, w = img.shape[:2]
    nh, nw = fit_size(h, w, size)
    out = np.full((size, size, 3), fill, np.uint8)
    px, py = (size - nw) // 2, (size - nh) // 2
    out[py:py + nh, px:px + nw] = resize(img, nw, nh)
    # per-axis scale: rounding the new size makes x and y ratios differ slightly
    lb = Letterbox(nw / w, nh / h, px, py)
    return out, scale_boxes(boxes, lb.sx, lb.sy, px, py), lb


def clip_boxes(boxes: np.ndarray, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    out = boxes.copy()
    out[:, [1, 3]] = out[:, [1, 3]].clip(x1, x2)
    out[:, [2, 4]] = out[:, [2, 4]].clip(y1, y2)
    return out


def box_filter(before: np.ndarray, after: np.ndarray, gain: float = 1.0, min_size: float = 2.0,
               min_area: float = 0.1, max_aspect: float = 20.0) -> np.ndarray:
    """Mask of boxes worth keeping after a crop: at least `min_size` px a side, at least `min_area` of their
    (gain-scaled) area before, and not a needle thinner than 1:`max_aspect`."""
    w0, h0 = (before[:, 3] - before[:, 1]) * gain, (before[:, 4] - before[:, 2]) * gain
    w, h = after[:, 3] - after[:, 1], after[:, 4] - after[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.maximum(w / h, h / w)
        area = (w * h) / (w0 * h0)
    return (w > min_size) & (h > min_size) & (area > min_area) & (aspect < max_aspect)


def random_affine(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, size: int,
                  aug: AugmentConfig = AugmentConfig(), fill: int = FILL) -> tuple[np.ndarray, np.ndarray]:
    """Warp `img` (any size) into a `size`x`size` output: its centre goes to the output centre, then a random
    rotation, zoom, shear and shift. Boxes are transformed, clipped and dropped when too little is left."""
    h, w = img.shape[:2]
    # always draw the same numbers so the stream of a sample does not depend on which ranges are zero
    angle, zoom, shx, shy, tx, ty = rng.uniform(-1, 1, 6)
    zoom = 1 + zoom * aug.scale
    a = math.radians(angle * aug.degrees)
    centre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    rot = np.array([[math.cos(a) * zoom, -math.sin(a) * zoom, 0], [math.sin(a) * zoom, math.cos(a) * zoom, 0],
                    [0, 0, 1]])
    shear = np.array([[1, math.tan(math.radians(shx * aug.shear)), 0],
                      [math.tan(math.radians(shy * aug.shear)), 1, 0], [0, 0, 1]])
    shift = np.array([[1, 0, size * (0.5 + tx * aug.translate)], [0, 1, size * (0.5 + ty * aug.translate)],
                      [0, 0, 1]])
    m = shift @ shear @ rot @ centre
    inv = np.linalg.inv(m)  # Pillow wants output -> input coordinates
    out = Image.fromarray(img).transform((size, size), Image.AFFINE, tuple(inv[:2].ravel()),
                                         resample=Image.BILINEAR, fillcolor=(fill,) * 3)
    out = np.asarray(out)
    if len(boxes) == 0:
        return out, boxes
    x1, y1, x2, y2 = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    corners = np.stack([np.stack([x1, y1]), np.stack([x2, y1]), np.stack([x2, y2]), np.stack([x1, y2])])  # 4,2,n
    xy = np.einsum("ij,kjn->kin", m[:2, :2], corners) + m[:2, 2:3]
    if m[0, 1] == 0 and m[1, 0] == 0:  # axis-aligned: clipping the box equals clipping the object
        moved = np.stack([boxes[:, 0], xy[:, 0].min(0), xy[:, 1].min(0), xy[:, 0].max(0), xy[:, 1].max(0)], 1)
        moved = clip_boxes(moved.astype(np.float32), 0, 0, size, size)
    else:  # rotated: clip the box outline itself, else a corner outside the image leaves an empty box behind
        moved = np.zeros_like(boxes)
        moved[:, 0] = boxes[:, 0]
        for i in range(len(boxes)):
            poly = clip_polygon(xy[:, :, i], size)
            if len(poly):
                moved[i, 1:3], moved[i, 3:5] = poly.min(0), poly.max(0)
        moved = clip_boxes(moved, 0, 0, size, size)  # rounding in the crossing points
    return out, moved[box_filter(boxes, moved, gain=zoom)]


def clip_polygon(points: np.ndarray, size: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a convex polygon (k, 2) inside [0, size]^2 (empty (0, 2) if none)."""
    pts = [tuple(p) for p in points]
    for axis, bound, keep_above in ((0, 0.0, True), (0, size, False), (1, 0.0, True), (1, size, False)):
        inside = (lambda p: p[axis] >= bound) if keep_above else (lambda p: p[axis] <= bound)
        out = []
        for k, cur in enumerate(pts):
            prev = pts[k - 1]
            if inside(cur) != inside(prev):  # the edge crosses the bound: add the crossing point
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if inside(cur):
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.array(pts, np.float32).reshape(-1, 2)


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    out = boxes.copy()
    out[:, 1], out[:, 3] = w - boxes[:, 3], w - boxes[:, 1]
    return img[:, ::-1], out


def hsv_jitter(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7,
               vgain: float = 0.4) -> np.ndarray:
    """Random hue shift (± hgain turns) and saturation / value gains (1 ± sgain, 1 ± vgain).

    Done in RGB, several times faster than converting to HSV and back: V = max(r, g, b) is scaled exactly, S
    exactly until a channel clips at 0, and the hue shift is a rotation about the grey axis (close to an HSV hue
    shift; ultralytics instead multiplies the hue).
    """
    dh, ds, dv = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain)
    if dh == 0 and ds == 0 and dv == 0:
        return img
    r, g, b = img.transpose(2, 0, 1).astype(np.float32)  # planes: elementwise numpy, no BLAS thread wake-ups
    if dh:  # Rodrigues rotation by dh turns about the grey axis k = (1,1,1)/sqrt(3); +1/3 turn maps red to green
        c, a = math.cos(2 * math.pi * dh), (1 - math.cos(2 * math.pi * dh)) / 3
        k = math.sin(2 * math.pi * dh) / math.sqrt(3)
        grey = a * (r + g + b)
        r, g, b = c * r + grey + k * (b - g), c * g + grey + k * (r - b), c * b + grey + k * (g - r)
    if ds:
        v = np.maximum(np.maximum(r, g), b)
        r, g, b = (v - (v - x) * (1 + ds) for x in (r, g, b))  # a channel's distance below V is proportional to S
    out = np.stack([r, g, b], -1)
    out *= 1 + dv
    return (out.clip(0, 255) + 0.5).astype(np.uint8)


def mosaic(tiles: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, size: int, fill: int = FILL
           ) -> tuple[np.ndarray, np.ndarray]:
    """Four (image, boxes) tiles, each already resized to long side `size`, around a random centre of a
    2*size square canvas; tiles are cropped at the canvas edge. Follow with random_affine(..., size) to crop."""
    if len(tiles) != 4:
        raise ValueError(f"mosaic needs 4 tiles, got {len(tiles)}")
    s2 = 2 * size
    xc, yc = (int(v) for v in rng.integers(size // 2, size + size // 2 + 1, 2))
    canvas = np.full((s2, s2, 3), fill, np.uint8)
    kept = []
    for k, (img, boxes) in enumerate(tiles):
        h, w = img.shape[:2]
        # tile k meets the centre with its bottom-right, bottom-left, top-right, top-left corner
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, s2), min(y0 + h, s2)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
        moved = scale_boxes(boxes, 1, 1, x0, y0)
        cut = clip_boxes(moved, cx1, cy1, cx2, cy2)
        kept.append(cut[box_filter(moved, cut)])
    return canvas, np.concatenate(kept, 0) if kept else np.zeros((0, 5), np.float32)


def xyxy_to_yolo(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, 5) pixel cls x1 y1 x2 y2 -> cls cx cy w h normalised by the image size."""
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, 0] = boxes[:, 0]
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / (2 * width)
    out[:, 2] = (boxes[:, 2] + boxes[:, 4]) / (2 * height)
    out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / width
    out[:, 4] = (boxes[:, 4] - boxes[:, 2]) / height
    return out


def yolo_to_xyxy(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    out = np.empty_like(labels, dtype=np.float32)
    out[:, 0] = labels[:, 0]
    out[:, 1] = (labels[:, 1] - labels[:, 3] / 2) * width
    out[:, 2] = (labels[:, 2] - labels[:, 4] / 2) * height
    out[:, 3] = (labels[:, 1] + labels[:, 3] / 2) * width
    out[:, 4] = (labels[:, 2] + labels[:, 4] / 2) * height
    return out

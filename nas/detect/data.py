"""YOLO-format detection data in the ultralytics convention: the data YAML, label checking, a Dataset and collate.

Augmentations live in nas.detect.augment, the DigitsDet generator in nas.detect.digits.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageOps

from nas.config import MISSING, check_keys, load_yaml, read, require_mapping, type_name
from nas.detect.augment import (
    AugmentConfig,
    fit_size,
    hflip,
    hsv_jitter,
    letterbox,
    mosaic,
    random_affine,
    resize,
    xyxy_to_yolo,
    yolo_to_xyxy,
)
from nas.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DATA_KEYS = ("path", "train", "val", "test", "names", "nc", "download")  # `download` is accepted and ignored
SPLITS = ("train", "val", "test")
COORD_TOLERANCE = 1e-6  # "1.0000001" from float printing is not a user error
SHOWN_PROBLEMS = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """A resolved data YAML: absolute paths, class names in id order."""
    source: str                 # the YAML file, for error messages
    root: Path
    train: tuple[Path, ...]     # folders of images or .txt lists of image paths
    val: tuple[Path, ...]
    names: tuple[str, ...]
    test: tuple[Path, ...] = ()

    @property
    def nc(self) -> int:
        return len(self.names)

    def split(self, name: str) -> tuple[Path, ...]:
        if name not in SPLITS:
            raise ConfigError(self.source, None, f'unknown split "{name}"; use one of {", ".join(SPLITS)}')
        entries = getattr(self, name)
        if not entries:
            raise ConfigError(self.source, name, "this data YAML has no such split")
        return entries


def _names(obj: Mapping, source: str) -> tuple[str, ...]:
    raw = read(obj, "names", (list, dict), source, None)
    if not raw:
        raise ConfigError(source, "names", "empty; list the class names, e.g. names: [cat, dog]")
    if isinstance(raw, list):
        items = list(enumerate(raw))
    else:
        keys = list(raw)
        if any(not isinstance(k, int) or isinstance(k, bool) for k in keys) or sorted(keys) != list(range(len(keys))):
            raise ConfigError(source, "names", f"keys must be the class ids 0..{len(keys) - 1}, got {keys[:10]}")
        items = sorted(raw.items())
    names = []
    for i, name in items:
        if isinstance(name, bool) or not isinstance(name, (str, int, float)):
            raise ConfigError(source, f"names[{i}]", f"expected a class name, got {type_name(name)}")
        names.append(str(name))
    return tuple(names)


def _expand(text: str) -> Path:
    """`~/x` -> home/x; `~name/x` for a user this machine doesn't know stays literal (and is then reported as not
    found) instead of raising RuntimeError."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def _show(p: Path) -> str:
    """A path from the YAML as one printable line (quoted when it holds newlines or control characters)."""
    text = str(p)
    return text if text.isprintable() else repr(text)


def _split_entries(obj: Mapping, key: str, root: Path, source: str, required: bool) -> tuple[Path, ...]:
    raw = read(obj, key, (str, list), source, None, default=MISSING if required else None)
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(source, key, "empty list; give a folder of images or a .txt list of image paths")
    out = []
    for i, item in enumerate(items):
        field = key if isinstance(raw, str) else f"{key}[{i}]"
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(source, field, f"expected a path, got {type_name(item)}")
        p = _expand(item)
        p = p if p.is_absolute() else root / p
        if p.is_dir() or (p.is_file() and p.suffix.lower() == ".txt"):
            out.append(p)
        elif p.is_file():
            raise ConfigError(source, field, f"{_show(p)} is a {p.suffix or 'plain'} file; expected a folder of "
                                             "images or a .txt list of image paths")
        else:
            raise ConfigError(source, field, f"not found: {_show(p)} (relative to path: {_show(root)}); expected a "
                                             f"folder such as images/{key} or a .txt list of image paths")
    return tuple(out)


def load_data_config(path: str | Path) -> DataConfig:
    """Read a data YAML (path, train, val, optional test, names, optional nc) and check that the splits exist.

    `path` is the dataset root (relative to the YAML's folder, default that folder); train/val/test are
    relative to it.
    """
    source = str(path)
    obj = require_mapping(load_yaml(path), source, None)
    check_keys(obj, DATA_KEYS, source, None)
    names = _names(obj, source)
    nc = read(obj, "nc", int, source, None, default=None)
    if nc is not None and nc != len(names):
        raise ConfigError(source, "nc", f"{nc} disagrees with the {len(names)} entries of names; fix or remove nc")
    base = Path(path).resolve().parent
    root_text = read(obj, "path", str, source, None, default=".")
    root = _expand(root_text)
    root = root if root.is_absolute() else (base / root)
    if not root.is_dir():
        raise ConfigError(source, "path", f"folder not found: {_show(root)} (a relative path starts at the YAML's "
                                          "folder)")
    train = _split_entries(obj, "train", root, source, True)
    val = _split_entries(obj, "val", root, source, True)
    test = _split_entries(obj, "test", root, source, False)
    return DataConfig(source, root, train, val, names, test)


def label_path(image: Path) -> Path:
    """labels/.../x.txt for images/.../x.png: the last `images` folder becomes `labels` (else next to the image)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


@dataclass(frozen=True)
class LabelProblem:
    file: Path
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line else f"{self.file}: {self.reason}"

    def error(self) -> ConfigError:
        return ConfigError(f"{self.file}:{self.line}" if self.line else str(self.file), None, self.reason)


def _check_line(parts: list[str], nc: int) -> tuple[list[float] | None, str | None]:
    if len(parts) != 5:
        return None, f"expected 5 values (class cx cy w h), got {len(parts)}"
    try:
        values = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        return None, f"not a number: {bad!r}"
    if not all(math.isfinite(v) for v in values):
        return None, f"non-finite value in {' '.join(parts)}"
    cls = values[0]
    if cls != int(cls) or not 0 <= cls < nc:
        return None, f"class {parts[0]} is not a class id 0..{nc - 1} (names has {nc} entries)"
    _, cx, cy, w, h = values
    if w <= 0 or h <= 0:
        return None, f"box has zero or negative size (w={parts[3]}, h={parts[4]})"
    for name, v in zip(("cx", "cy", "w", "h"), values[1:]):
        if not -COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE:
            return None, f"{name}={v:g} outside [0, 1]; coordinates must be normalised by the image width/height"
    return values, None


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_label_file(path: Path, nc: int) -> tuple[np.ndarray, list[LabelProblem]]:
    """Rows (n, 5) = cls, cx, cy, w, h of the valid lines, and one LabelProblem per bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return np.zeros((0, 5), np.float32), [LabelProblem(path, None, "not UTF-8 text")]
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        values, reason = _check_line(parts, nc)
        if reason:
            problems.append(LabelProblem(path, number, reason))
        else:
            rows.append(values)
    labels = np.array(rows, np.float32).reshape(-1, 5)
    labels[:, 1:] = labels[:, 1:].clip(0, 1)
    return labels, problems


def list_images(entries: tuple[Path, ...]) -> tuple[list[Path], list[LabelProblem]]:
    """Image files of folders (recursive, sorted) and .txt lists (relative lines start at the list's folder)."""
    files, problems = [], []
    for entry in entries:
        if entry.is_dir():
            files += sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            continue
        try:
            text = entry.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:  # the whole split hangs on this list: stop rather than skip it
            raise ConfigError(str(entry), None, f"not UTF-8 text (byte {e.start}); an image list is one path per "
                                                "line") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            p = _expand(line)
            p = p if p.is_absolute() else entry.parent / p
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(LabelProblem(entry, number, f"not an image ({', '.join(IMAGE_SUFFIXES)}): {line}"))
            elif not p.is_file():
                problems.append(LabelProblem(entry, number, f"image not found: {p}"))
            else:
                files.append(p)
    return files, problems


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3): EXIF rotation applied (labels refer to the upright image), grey/RGBA/palette -> RGB."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit or float grey: rescale instead of clipping
                a = np.asarray(im, np.float32)
                im = Image.fromarray((a * (255.0 / max(float(a.max()), 1.0))).astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), None, f"cannot read image: {e}") from None


def _report(problems: list[LabelProblem], where: str) -> None:
    if not problems:
        return
    files = len({p.file for p in problems})
    shown = "; ".join(str(p) for p in problems[:SHOWN_PROBLEMS])
    more = f"; ... {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    # One record per split, not per line: thousands of bad lines stay one line on screen.
    log.warning("%s: skipped %d bad label line(s) in %d file(s): %s%s (strict=True or nas train --strict stops at "
                "the first)", where, len(problems), files, shown, more)


class YoloDataset(torch.utils.data.Dataset):
    """One split of a YOLO-format dataset as (image, labels, path) samples of a fixed square size.

    Labels are parsed once, at construction. With augment=True a sample is mosaic (probability `mosaic`) or a
    single image, then random affine, HSV jitter and horizontal flip; the result depends only on (seed, epoch,
    index), so DataLoader workers and reruns agree. Call set_epoch(e) each epoch and close_mosaic() for the last
    epochs. Note: DataLoader(persistent_workers=True) keeps stale copies of the dataset, so these calls would not
    reach the workers.
    """

    def __init__(self, data: DataConfig | str | Path, split: str, imgsz: int = 320, augment: bool = False,
                 mosaic: float = 1.0, strict: bool = False, hyp: AugmentConfig | Mapping[str, Any] | None = None,
                 seed: int = 0):
        self.cfg = data if isinstance(data, DataConfig) else load_data_config(data)
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 8:
            raise ConfigError(None, "imgsz", f"must be an integer >= 8, got {imgsz!r}")
        if not 0.0 <= mosaic <= 1.0:
            raise ConfigError(None, "mosaic", f"must be a probability in [0, 1], got {mosaic!r}")
        self.split, self.imgsz, self.augment, self.mosaic, self.seed = split, imgsz, augment, float(mosaic), seed
        self.hyp = hyp if isinstance(hyp, AugmentConfig) else AugmentConfig.from_mapping(hyp or {})
        self.names = self.cfg.names
        self.epoch = 0
        self.files, problems = list_images(self.cfg.split(split))
        if strict and problems:
            raise problems[0].error()
        if not self.files:
            raise ConfigError(self.cfg.source, split, "no images (" + ", ".join(IMAGE_SUFFIXES) + ") found in "
                              + ", ".join(str(p) for p in self.cfg.split(split)))
        self.labels: list[np.ndarray] = []  # per image (n, 5) = cls, cx, cy, w, h normalised; empty = background
        for f in self.files:
            lp = label_path(f)
            if not lp.is_file():
                self.labels.append(np.zeros((0, 5), np.float32))
                continue
            labels, bad = parse_label_file(lp, self.cfg.nc)
            if strict and bad:
                raise bad[0].error()
            problems += bad
            self.labels.append(labels)
        _report(problems, f"{self.cfg.source} ({split})")

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def close_mosaic(self) -> None:
        """Train the final epochs on single images, closer to what validation sees."""
        self.mosaic = 0.0

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the original image after EXIF rotation, read from the header only."""
        with Image.open(self.files[index]) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        return (w, h) if rotated else (h, w)

    def _load(self, index: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image (resized so the long side is `size` when given) and its pixel xyxy boxes."""
        img = read_image(self.files[index])
        if size is not None:
            nh, nw = fit_size(img.shape[0], img.shape[1], size)
            img = resize(img, nw, nh)
        return img, yolo_to_xyxy(self.labels[index], img.shape[1], img.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        s = self.imgsz
        if not self.augment:
            img, boxes, _ = letterbox(*self._load(index), s)
        else:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if rng.random() < self.mosaic:  # always drawn: the random stream does not depend on the mosaic setting
                others = rng.integers(0, len(self), 3)
                img, boxes = mosaic([self._load(j, s) for j in (index, *others)], rng, s)
            else:
                img, boxes = self._load(index, s)
            img, boxes = random_affine(img, boxes, rng, s, self.hyp)
            img = hsv_jitter(img, rng, self.hyp.hsv_h, self.hyp.hsv_s, self.hyp.hsv_v)
            if rng.random() < self.hyp.fliplr:
                img, boxes = hflip(img, boxes)
        chw = img.transpose(2, 0, 1).astype(np.float32)  # numpy: no torch thread pool inside loader workers
        chw *= 1 / 255
        tensor = torch.from_numpy(chw)
        return tensor, torch.from_numpy(xyxy_to_yolo(boxes, s, s)), str(self.files[index])


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, str]]
            ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack images (B, 3, S, S); concatenate labels into targets (N, 6) = batch_idx, cls, cx, cy, w, h."""
    imgs = torch.stack([b[0] for b in batch])
    targets = [torch.cat([torch.full((len(b[1]), 1), float(i)), b[1]], 1) for i, b in enumerate(batch)]
    return imgs, torch.cat(targets, 0) if targets else torch.zeros((0, 6)), [b[2] for b in batch]

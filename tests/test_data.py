"""YOLO-format data: data YAML, label checking, loader, augmentations and the DigitsDet generator."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas.detect.augment import (
    AugmentConfig,
    hflip,
    hsv_jitter,
    letterbox,
    mosaic,
    random_affine,
    xyxy_to_yolo,
    yolo_to_xyxy,
)
from nas.detect.data import DataConfig, YoloDataset, collate, label_path, load_data_config, parse_label_file
from nas.detect.digits import DigitsParams, digit_sizes, ensure_digits, generate_digits, load_glyphs, paste_digits
from nas.errors import ConfigError

TINY = dict(n_train=6, n_val=3, imgsz=64, min_size=8, max_size=24, progress=False, workers=0)
NO_COLOUR = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
COLOURS = {0: (230, 30, 30), 1: (30, 220, 40), 2: (40, 40, 235)}  # one solid colour per class


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_set(root: Path, images: dict[str, tuple[np.ndarray | Image.Image, str | None]], split: str = "train",
             names: str = "[a, b, c]") -> Path:
    """images/<split>/<name> + labels/<split>/<stem>.txt (None = no label file) + data.yaml."""
    for name, (img, labels) in images.items():
        p = root / "images" / split / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(p)
        if labels is not None:
            lp = label_path(p)
            lp.parent.mkdir(parents=True, exist_ok=True)
            lp.write_text(labels)
    (root / "images" / "val").mkdir(parents=True, exist_ok=True)
    return write_yaml(root / "data.yaml", f"path: .\ntrain: images/{split}\nval: images/val\nnames: {names}\n")


def rect_image(h: int, w: int, rects: list[tuple[int, int, int, int, int]], bg: int = 60
               ) -> tuple[np.ndarray, str]:
    """Grey image with solid class-coloured rectangles (cls, x1, y1, x2, y2) and its YOLO label text."""
    img = np.full((h, w, 3), bg, np.uint8)
    lines = []
    for c, x1, y1, x2, y2 in rects:
        img[y1:y2, x1:x2] = COLOURS[c]
        lines.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return img, "\n".join(lines) + "\n"


def colour_mask(img: np.ndarray, cls: int) -> np.ndarray:
    return (np.abs(img.astype(int) - COLOURS[cls]).max(-1) < 40)


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- DigitsDet


def test_digits_same_seed_same_bytes_any_workers_other_seed_differs(tmp_path):
    a = generate_digits(tmp_path / "a", seed=3, **TINY).parent
    first = tree_bytes(a)
    assert len([k for k in first if k.endswith(".png")]) == 9
    generate_digits(a, seed=3, **TINY)  # regenerate in place: every file identical, including data.yaml
    assert tree_bytes(a) == first
    # two processes in chunks vs one process: same images and labels
    big = dict(TINY, n_train=120, n_val=0)
    serial = tree_bytes(generate_digits(tmp_path / "s", seed=3, **big).parent)
    parallel = tree_bytes(generate_digits(tmp_path / "p", seed=3, **dict(big, workers=2)).parent)
    pick = lambda d: {k: v for k, v in d.items() if k.startswith(("images", "labels"))}  # noqa: E731
    assert pick(serial) == pick(parallel) and len(pick(serial)) == 240
    other = tree_bytes(generate_digits(tmp_path / "b", seed=4, **TINY).parent)
    pngs = [k for k in first if k.endswith(".png")]
    assert all(first[k] != other[k] for k in pngs)


def test_digits_layout_and_labels_are_valid(tmp_path):
    yaml_path = generate_digits(tmp_path / "d", seed=0, **dict(TINY, n_train=12))
    cfg = load_data_config(yaml_path)
    assert cfg.names == tuple("0123456789") and cfg.train == (tmp_path / "d" / "images" / "train",)
    for split, n in (("train", 12), ("val", 3)):
        images = sorted((tmp_path / "d" / "images" / split).glob("*.png"))
        assert len(images) == n
        for img in images:
            with Image.open(img) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
            labels, problems = parse_label_file(label_path(img), 10)
            assert problems == [] and 1 <= len(labels) <= 6
            x1y1x2y2 = yolo_to_xyxy(labels, 64, 64)
            assert (x1y1x2y2[:, 1:] >= -1e-4).all() and (x1y1x2y2[:, 1:] <= 64 + 1e-4).all()


def test_digit_sizes_default_fits_the_image_size(tmp_path):
    assert digit_sizes(320) == digit_sizes(192) == (16, 96)  # the sizes every DigitsDet so far was made with
    assert digit_sizes(128) == (16, 64) and digit_sizes(20) == (10, 10) and digit_sizes(128, max_size=12) == (12, 12)
    assert digit_sizes(128, 20, 30) == (20, 30)
    # library callers get the same default as `nas data digits`: 128 px works without choosing sizes
    yaml_path = generate_digits(tmp_path / "d", 4, 0, imgsz=128, progress=False, workers=0)
    manifest = (tmp_path / "d" / "digitsdet.json").read_text()
    assert '"min_size": 16' in manifest and '"max_size": 64' in manifest
    heights = [float(line.split()[4]) for f in (tmp_path / "d" / "labels").rglob("*.txt")
               for line in f.read_text().splitlines()]
    assert heights and max(heights) <= 0.5
    assert ensure_digits(tmp_path / "d", 4, 0, imgsz=128, progress=False) == yaml_path  # same params: reused


def test_pasted_digits_match_their_boxes_exactly():
    glyphs, classes = load_glyphs()["train"]
    params = DigitsParams(imgsz=128, min_size=12, max_size=40, max_digits=6)
    for seed in range(5):
        canvas = np.full((128, 128, 3), 128, np.uint8)
        boxes = paste_digits(np.random.default_rng(seed), canvas, glyphs, classes, params)
        assert boxes
        inked = (canvas != 128).any(-1)
        covered = np.zeros_like(inked)
        for c, x1, y1, x2, y2 in boxes:
            assert 0 <= c <= 9 and 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            covered[y1:y2, x1:x2] = True
            box = inked[y1:y2, x1:x2]
            # tight: ink touches all four edges of its box
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        assert not (inked & ~covered).any()  # no ink outside the boxes


def test_ensure_digits_reuses_matching_set_and_refuses_foreign_folder(tmp_path):
    root = tmp_path / "digits"
    y1 = ensure_digits(root, seed=1, **TINY)
    png = root / "images" / "train" / "000000.png"
    stamp = png.stat().st_mtime_ns
    os.utime(png, ns=(stamp - 10**9, stamp - 10**9))
    assert ensure_digits(root, seed=1, **TINY) == y1
    assert png.stat().st_mtime_ns == stamp - 10**9  # not regenerated
    old = png.read_bytes()
    ensure_digits(root, seed=2, **TINY)  # other parameters: regenerated
    assert png.read_bytes() != old
    (root / "images" / "train" / "000001.png").unlink()  # damaged: regenerated
    ensure_digits(root, seed=2, **TINY)
    assert (root / "images" / "train" / "000001.png").is_file()
    foreign = tmp_path / "mine"
    (foreign / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match="digitsdet.json"):
        generate_digits(foreign, **TINY)


# ---------------------------------------------------------------- data YAML


def test_data_yaml_errors_name_file_and_field(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "val").mkdir(parents=True)
    cases = {
        "path: .\ntrain: images/train\nval: images/val\n": ("names", "required field is missing"),
        "path: .\ntrain: images/train\nval: images/val\nnames: [a]\nnmes: [a]\n": ("nmes", 'did you mean "names"'),
        "path: .\ntrain: images/train\nval: images/nope\nnames: [a]\n": ("val", "not found"),
        "path: nowhere\ntrain: images/train\nval: images/val\nnames: [a]\n": ("path", "folder not found"),
        "train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n": ("nc", "disagrees"),
        "train: images/train\nval: images/val\nnames: {0: a, 2: b}\n": ("names", "class ids"),
        "train: images/train\nval: [images/val, 5]\nnames: [a]\n": ("val[1]", "expected a path"),
    }
    for i, (text, (field, words)) in enumerate(cases.items()):
        path = write_yaml(tmp_path / f"bad{i}.yaml", text)
        with pytest.raises(ConfigError) as e:
            load_data_config(path)
        assert e.value.source == str(path) and e.value.field == field, text
        assert words in str(e.value) and str(e.value).startswith(f"{path}: {field}: ")


def test_names_dict_txt_list_and_path_relative_to_yaml(tmp_path):
    img, lbl = rect_image(32, 32, [(1, 4, 4, 20, 20)])
    make_set(tmp_path / "ds", {"x.png": (img, lbl), "y.png": (img, lbl)})
    (tmp_path / "ds" / "train.txt").write_text("images/train/y.png\n\n./images/train/x.png\n")
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    path = write_yaml(cfg_dir / "d.yaml", "path: ../ds\ntrain: train.txt\nval: images/train\n"
                                          "names: {1: dog, 0: cat}\nnc: 2\ndownload: ignored\n")
    cfg = load_data_config(path)
    assert isinstance(cfg, DataConfig) and cfg.names == ("cat", "dog") and cfg.nc == 2
    ds = YoloDataset(cfg, "train", imgsz=32)
    assert [Path(f).name for f in ds.files] == ["y.png", "x.png"]  # the list's order
    assert ds[0][1][:, 0].tolist() == [1.0]
    with pytest.raises(ConfigError, match="no such split"):
        YoloDataset(cfg, "test")


# ---------------------------------------------------------------- labels

BAD_LINES = [  # (line, words expected in the reason)
    ("0 0.5 0.5 0.2", "expected 5 values"),
    ("0 0.5 abc 0.2 0.2", "not a number: 'abc'"),
    ("7 0.5 0.5 0.2 0.2", "class 7"),
    ("1.5 0.5 0.5 0.2 0.2", "class 1.5"),
    ("0 nan 0.5 0.2 0.2", "non-finite"),
    ("0 0.5 inf 0.2 0.2", "non-finite"),
    ("0 1.5 0.5 0.2 0.2", "cx=1.5 outside [0, 1]"),
    ("0 0.5 0.5 0.2 -0.1", "zero or negative size"),
    ("0 0.5 0.5 0 0.2", "zero or negative size"),
]


def test_bad_label_lines_skipped_with_one_warning(tmp_path, caplog):
    good = "1 0.25 0.25 0.1 0.1"
    text = "\n".join([good] + [line for line, _ in BAD_LINES] + ["", "2 0.5 0.5 0.2 0.2"]) + "\n"
    img = np.full((20, 20, 3), 90, np.uint8)
    yaml_path = make_set(tmp_path, {"a.png": (img, text), "b.png": (img, "0 0.5 0.5 0.5 0.5\n9 0 0 1 1\n")})
    with caplog.at_level(logging.WARNING, logger="nas"):
        ds = YoloDataset(yaml_path, "train", imgsz=32)
    ours = [r for r in caplog.records if r.name == "nas.detect.data" and r.levelno == logging.WARNING]
    assert len(ours) == 1
    msg = ours[0].getMessage()
    a_txt = tmp_path / "labels" / "train" / "a.txt"
    assert f"skipped {len(BAD_LINES) + 1} bad label line(s) in 2 file(s)" in msg
    for number, (_, words) in enumerate(BAD_LINES[:5], 2):  # the first five are spelled out
        assert f"{a_txt}:{number}: " in msg and words in msg
    assert ds.labels[0][:, 0].tolist() == [1.0, 2.0] and ds.labels[1][:, 0].tolist() == [0.0]


@pytest.mark.parametrize("line,words", BAD_LINES)
def test_bad_label_line_strict_names_file_and_line(tmp_path, line, words):
    img = np.full((20, 20, 3), 90, np.uint8)
    yaml_path = make_set(tmp_path, {"a.png": (img, f"0 0.5 0.5 0.1 0.1\n\n{line}\n1 0.5 0.5 0.1 0.1\n")})
    with pytest.raises(ConfigError) as e:
        YoloDataset(yaml_path, "train", strict=True)
    assert str(e.value).startswith(f"{tmp_path / 'labels' / 'train' / 'a.txt'}:3: ") and words in str(e.value)


def test_grey_rgba_palette_load_as_rgb_and_missing_label_is_background(tmp_path):
    grey = Image.fromarray(np.full((16, 32), 200, np.uint8), "L")
    rgba = Image.fromarray(np.dstack([np.full((32, 32, 3), (10, 120, 250), np.uint8),
                                      np.full((32, 32), 7, np.uint8)]), "RGBA")
    pal = Image.fromarray(np.full((32, 32, 3), (250, 0, 0), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    yaml_path = make_set(tmp_path, {"g.png": (grey, "0 0.5 0.5 0.5 0.5\n"), "r.png": (rgba, "1 0.5 0.5 1 1\n"),
                                    "p.bmp": (pal, None), "q.jpg": (Image.fromarray(np.zeros((8, 8, 3), np.uint8)),
                                                                    None)})
    ds = YoloDataset(yaml_path, "train", imgsz=32)
    items = {Path(p).name: (img, lbl) for img, lbl, p in (ds[i] for i in range(len(ds)))}
    assert set(items) == {"g.png", "r.png", "p.bmp", "q.jpg"}
    for img, _ in items.values():
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    g = to_hwc(items["g.png"][0])
    assert (g[8:24] == 200).all() and (g[:8] == 114).all()  # grey replicated; letterbox pad rows are 114
    assert (to_hwc(items["r.png"][0]) == (10, 120, 250)).all()  # alpha dropped, colour kept
    assert (to_hwc(items["p.bmp"][0]) == (250, 0, 0)).all()
    assert items["p.bmp"][1].shape == (0, 5) and items["q.jpg"][1].shape == (0, 5)
    imgs, targets, paths = collate([ds[i] for i in range(len(ds))])
    assert imgs.shape == (4, 3, 32, 32) and targets.shape == (2, 6) and len(paths) == 4
    names = [Path(p).name for p in paths]
    assert sorted(targets[:, 0].long().tolist()) == sorted([names.index("g.png"), names.index("r.png")])


# ---------------------------------------------------------------- loader on DigitsDet


def test_loader_shapes_on_digits(tmp_path):
    yaml_path = generate_digits(tmp_path / "d", seed=0, **TINY)
    for augment in (False, True):
        ds = YoloDataset(yaml_path, "train", imgsz=48, augment=augment)
        assert len(ds) == 6 and ds.names == tuple("0123456789")
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
        imgs, targets, paths = next(iter(loader))
        assert imgs.shape == (4, 3, 48, 48) and imgs.dtype == torch.float32
        assert 0 <= imgs.min() and imgs.max() <= 1
        assert targets.ndim == 2 and targets.shape[1] == 6 and len(paths) == 4
        assert set(targets[:, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert (targets[:, 1] == targets[:, 1].round()).all() and targets[:, 1].max() <= 9
        assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
        if not augment:  # letterbox of a square image: labels unchanged
            files = [ds.labels[i] for i in range(4)]
            assert targets.shape[0] == sum(len(f) for f in files)
            assert torch.allclose(targets[:, 1:], torch.from_numpy(np.concatenate(files)), atol=1e-6)


def test_letterbox_maps_boxes_on_hand_made_image(tmp_path):
    img, lbl = rect_image(40, 80, [(0, 20, 10, 40, 30)])  # h=40, w=80: scale 0.8 then 16 px pad above/below
    ds = YoloDataset(make_set(tmp_path, {"r.png": (img, lbl)}), "train", imgsz=64)
    tensor, labels, _ = ds[0]
    out = to_hwc(tensor)
    box = yolo_to_xyxy(labels.numpy(), 64, 64)[0, 1:]
    np.testing.assert_allclose(box, [16, 24, 32, 40], atol=1e-3)
    ys, xs = np.nonzero(colour_mask(out, 0))
    assert abs(xs.min() - 16) <= 1 and abs(xs.max() + 1 - 32) <= 1 and abs(ys.min() - 24) <= 1
    assert abs(ys.max() + 1 - 40) <= 1
    assert (out[:16] == 114).all() and (out[48:] == 114).all()
    # and back to the original image
    _, mapped, lb = letterbox(img, yolo_to_xyxy(np.array([[0, 0.375, 0.5, 0.25, 0.5]], np.float32), 80, 40), 64)
    np.testing.assert_allclose(lb.to_original(mapped)[0, 1:], [20, 10, 40, 30], atol=1e-4)


def test_flip_twice_is_identity_and_flip_mirrors_boxes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    boxes = np.array([[1, 5, 2, 20, 12], [0, 30, 10, 50, 30]], np.float32)
    once_img, once = hflip(img, boxes)
    np.testing.assert_array_equal(once[:, 1:], [[30, 2, 45, 12], [0, 10, 20, 30]])
    np.testing.assert_array_equal(once_img[:, 0], img[:, -1])
    twice_img, twice = hflip(once_img, once)
    np.testing.assert_array_equal(twice_img, img)
    np.testing.assert_array_equal(twice, boxes)


def check_boxes_follow_objects(img: np.ndarray, labels: np.ndarray, size: int, tight: bool,
                               allow: dict[int, float]) -> None:
    """Boxes inside the image; each box holds its class colour; class-coloured pixels lie inside boxes except
    for at most allow[c] pixels (what is left of objects dropped as too cut: < 10% of their area, or <= 2 px thin)."""
    boxes = yolo_to_xyxy(labels, size, size)
    assert (boxes[:, 1:] >= -1e-3).all() and (boxes[:, 1:] <= size + 1e-3).all()
    for c in COLOURS:
        mask = colour_mask(img, c)
        covered = np.zeros_like(mask)
        for _, x1, y1, x2, y2 in boxes[boxes[:, 0] == c]:
            covered[max(int(y1) - 1, 0):math.ceil(y2) + 1, max(int(x1) - 1, 0):math.ceil(x2) + 1] = True
            inner = mask[math.ceil(y1) + 1:int(y2) - 1, math.ceil(x1) + 1:int(x2) - 1]
            if inner.size and tight:
                assert inner.mean() > 0.9, "box does not hold its object"
            elif inner.size:
                assert inner.any()
        assert (mask & ~covered).sum() <= allow[c]


def test_affine_and_mosaic_boxes_follow_the_objects(tmp_path):
    images = {
        "a.png": rect_image(60, 90, [(0, 5, 5, 30, 40), (1, 50, 20, 85, 55)]),
        "b.png": rect_image(80, 80, [(2, 10, 30, 70, 70)]),
        "c.png": rect_image(100, 50, [(1, 5, 5, 45, 30), (0, 20, 60, 40, 95)]),
        "d.png": rect_image(64, 64, [(2, 20, 20, 40, 40)]),
    }
    yaml_path = make_set(tmp_path, images)
    allow = {c: 0.0 for c in COLOURS}  # per class: 10% of the largest object at the largest zoom, or a 2 px sliver
    for name, (img, text) in images.items():
        r = 64 / max(img.shape[:2]) * 1.5
        for line in text.split("\n")[:-1]:
            c, _, _, w, h = map(float, line.split())
            w, h = w * img.shape[1] * r, h * img.shape[0] * r
            allow[int(c)] = max(allow[int(c)], 0.1 * w * h, 3 * max(w, h))
    seen_mosaic = 0
    for mos, hyp in ((1.0, NO_COLOUR), (0.0, NO_COLOUR), (1.0, dict(NO_COLOUR, degrees=20.0, shear=5.0))):
        ds = YoloDataset(yaml_path, "train", imgsz=64, augment=True, mosaic=mos, hyp=hyp, seed=7)
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                tensor, labels, _ = ds[i]
                check_boxes_follow_objects(to_hwc(tensor), labels.numpy(), 64, tight=hyp.get("degrees", 0) == 0,
                                           allow=allow)
                seen_mosaic += mos == 1.0 and len(labels) > 2
    assert seen_mosaic > 3  # mosaics really combined several images


def test_random_affine_box_matches_the_warped_object():
    img, text = rect_image(96, 128, [(0, 40, 30, 90, 70)])
    boxes = yolo_to_xyxy(np.array([[float(v) for v in text.split()]], np.float32), 128, 96)
    for seed in range(10):
        out, moved = random_affine(img, boxes, np.random.default_rng(seed), 128, AugmentConfig(scale=0.3))
        ys, xs = np.nonzero(colour_mask(out, 0))
        assert len(moved) == 1
        np.testing.assert_allclose(moved[0, 1:], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)


def test_random_affine_keeps_boxes_inside_for_wild_settings():
    aug = AugmentConfig(degrees=45, translate=0.4, scale=0.9, shear=20)
    img = np.zeros((50, 70, 3), np.uint8)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        xy = np.sort(rng.uniform(0, 50, (12, 2, 2)), axis=1)
        boxes = np.concatenate([np.zeros((12, 1)), xy[:, 0, :1] * 1.4, xy[:, 0, 1:], xy[:, 1, :1] * 1.4,
                                xy[:, 1, 1:] + 0.5], 1).astype(np.float32)
        out, moved = random_affine(img, boxes, rng, 40, aug)
        assert out.shape == (40, 40, 3)
        assert (moved[:, 1:] >= 0).all() and (moved[:, 1:] <= 40).all()
        assert ((moved[:, 3] - moved[:, 1]) > 2).all() and ((moved[:, 4] - moved[:, 2]) > 2).all()


def test_mosaic_places_four_tiles_around_the_centre():
    tiles = [(np.full((32, 24, 3), 10 * (k + 1), np.uint8), np.array([[k, 0, 0, 24, 32]], np.float32))
             for k in range(4)]
    canvas, boxes = mosaic(tiles, np.random.default_rng(1), 32)
    assert canvas.shape == (64, 64, 3) and len(boxes) == 4
    for k, (c, x1, y1, x2, y2) in enumerate(boxes):
        assert c == k and (canvas[int(y1):int(y2), int(x1):int(x2)] == 10 * (k + 1)).all()
    xc, yc = boxes[0, 3], boxes[0, 4]  # tile 0 ends at the centre, tile 3 starts there
    assert boxes[3, 1] == xc and boxes[3, 2] == yc


def test_samples_depend_on_seed_index_epoch_only(tmp_path):
    yaml_path = generate_digits(tmp_path / "d", seed=0, **TINY)
    a = YoloDataset(yaml_path, "train", imgsz=48, augment=True, seed=5)
    b = YoloDataset(yaml_path, "train", imgsz=48, augment=True, seed=5)
    x, y = a[2], b[2]
    _ = a[3]  # order of access does not matter
    assert torch.equal(x[0], a[2][0]) and torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    b.set_epoch(1)
    assert not torch.equal(x[0], b[2][0])
    c = YoloDataset(yaml_path, "train", imgsz=48, augment=True, seed=6)
    assert not torch.equal(x[0], c[2][0])


def test_close_mosaic_switches_to_single_images(tmp_path):
    yaml_path = generate_digits(tmp_path / "d", seed=0, **TINY)
    with_mosaic = YoloDataset(yaml_path, "train", imgsz=48, augment=True, mosaic=1.0, seed=1)
    without = YoloDataset(yaml_path, "train", imgsz=48, augment=True, mosaic=0.0, seed=1)
    assert any(not torch.equal(with_mosaic[i][0], without[i][0]) for i in range(len(without)))
    with_mosaic.close_mosaic()
    for i in range(len(without)):
        assert torch.equal(with_mosaic[i][0], without[i][0]) and torch.equal(with_mosaic[i][1], without[i][1])


def test_hsv_jitter():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert hsv_jitter(img, rng, 0, 0, 0) is img
    grey = np.full((4, 4, 3), 100, np.uint8)
    for seed in range(5):  # hue and saturation leave grey alone; value scales it
        out = hsv_jitter(grey, np.random.default_rng(seed), 0.5, 0.9, 0.0)
        assert (np.abs(out.astype(int) - 100) <= 1).all()
    dv = np.random.default_rng(3).uniform(-1, 1, 3)[2] * 0.4
    out = hsv_jitter(img, np.random.default_rng(3), 0, 0, 0.4)
    np.testing.assert_allclose(out, (img * (1 + dv)).clip(0, 255), atol=1)
    # a hue shift of +1/3 turn sends red to green: pick the gain that makes this seed's draw exactly 1/3
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    u = np.random.default_rng(4).uniform(-1, 1, 3)
    green = hsv_jitter(red, np.random.default_rng(4), (1 / 3) / u[0], 0, 0)
    assert (green[..., 1] >= 199).all() and (green[..., [0, 2]] <= 1).all()
    # saturation gain 0.5: the grey part stays, the chroma halves
    pastel = np.array([[[200, 150, 150]]], np.uint8)
    np.testing.assert_array_equal(hsv_jitter(pastel, np.random.default_rng(4), 0, -0.5 / u[1], 0), [[[200, 175, 175]]])


def test_box_format_round_trip():
    boxes = np.array([[3, 4.0, 8.0, 20.0, 30.0]], np.float32)
    np.testing.assert_allclose(yolo_to_xyxy(xyxy_to_yolo(boxes, 40, 50), 40, 50), boxes, atol=1e-5)


def test_augment_config_from_mapping_rejects_typos_and_ranges():
    assert AugmentConfig.from_mapping({"fliplr": 0, "scale": 0.25}) == AugmentConfig(fliplr=0.0, scale=0.25)
    with pytest.raises(ConfigError, match='did you mean "fliplr"'):
        AugmentConfig.from_mapping({"flip_lr": 0.5})
    with pytest.raises(ConfigError, match=r"fliplr: must be in \[0, 1.0\]"):
        AugmentConfig.from_mapping({"fliplr": 2})


def test_fliplr_zero_never_mirrors_and_one_always_does(tmp_path):
    """With every other augmentation off, fliplr 0 gives the plain letterboxed image and fliplr 1 its mirror image:
    the setting that keeps digits, text and other handed objects the right way round."""
    images = {"a.png": rect_image(64, 64, [(0, 4, 8, 20, 40), (1, 40, 30, 60, 60)])}
    yaml_path = make_set(tmp_path, images)
    still = dict(NO_COLOUR, translate=0.0, scale=0.0)
    plain, _, _ = YoloDataset(yaml_path, "train", imgsz=64, augment=False)[0]
    for fliplr, expect in ((0.0, plain), (1.0, torch.flip(plain, dims=[-1]))):
        ds = YoloDataset(yaml_path, "train", imgsz=64, augment=True, mosaic=0.0, hyp=dict(still, fliplr=fliplr))
        for epoch in range(4):
            ds.set_epoch(epoch)
            tensor, labels, _ = ds[0]
            torch.testing.assert_close(tensor, expect, atol=0, rtol=0)
            assert (labels[:, 1] > 0.5).tolist() == ([False, True] if fliplr == 0 else [True, False])

"""Training checkpoints that load with `torch.load(weights_only=True)`: tensors, numbers, strings and the arch as
YAML text, never pickled Python objects. Also the RNG snapshot that makes a resumed run repeat the original."""
from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.arch.detector import Detector
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import dumps_arch, loads_arch
from nas.errors import NasError
from nas.system import write_atomically

FORMAT = "nas/checkpoint@1"
META_KEYS = ("arch_yaml", "num_classes", "neck", "width", "depth", "reg_max")  # what detector_from_meta reads


def model_meta(model: Detector, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """What it takes to rebuild the Detector: arch YAML text and the constructor arguments."""
    h = model.head_config
    return {"arch_yaml": dumps_arch(model.arch), "num_classes": h.num_classes, "neck": h.neck, "width": h.width,
            "depth": h.depth, "reg_max": h.reg_max, "act": h.act, "names": list(names)}


# The "dw" neck's fusion blocks were nn.Sequential(depthwise ConvBN, pointwise ConvBN) before they became
# DepthwiseSeparable: their children ".0"/".1" are now ".dw"/".pw". No other key has a digit there.
_OLD_FUSION_KEY = re.compile(r"^(neck\.(?:td4|td3|bu4|bu5)\.\d+)\.([01])(?=\.|$)")


def migrate_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A Detector state_dict with the keys of older checkpoints renamed to today's; current keys pass unchanged."""
    def rename(key: str) -> str:
        return _OLD_FUSION_KEY.sub(lambda m: f"{m[1]}.{('dw', 'pw')[int(m[2])]}", key)

    out = type(state)((rename(k), v) for k, v in state.items())
    if hasattr(state, "_metadata"):  # per-module versions load_state_dict reads, keyed by module path
        out._metadata = type(state._metadata)((rename(k), v) for k, v in state._metadata.items())
    return out


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / random states as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "random": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["state"]), r["gauss"]))


def save_checkpoint(ckpt: dict[str, Any], path: str | Path, fix: str = "free space and save it again") -> Path:
    """Write atomically (temp file + rename), so an interrupted save never leaves a truncated last.pt; a full disk is
    a NasError naming the file, the cause and `fix`, and the previous checkpoint stays whole."""
    # torch.save into an open file, not a path: its RuntimeError then keeps the OSError (EFBIG, ENOSPC) as context
    return write_atomically(path, lambda f: torch.save({"format": FORMAT, **ckpt}, f), "saving the checkpoint", fix)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only=True); files holding pickled objects are refused with a NasError."""
    p = Path(path)
    if not p.is_file():
        raise NasError(f"{p}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's note on raw pickles would break the one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # "Unsupported global: GLOBAL x.y" (zip checkpoints) or "unsupported GLOBAL posix.system" (legacy/raw pickles)
        globals_ = [ln for ln in lines if "global" in ln.lower() and "unsupported" in ln.lower()]
        with p.open("rb") as f:
            raw_pickle = f.read(2) in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
        if not globals_ and not raw_pickle:  # not even a pickle of known opcodes: garbage or truncated
            raise NasError(f"{p}: not a readable checkpoint (corrupt, truncated or not written by torch.save)"
                           ) from None
        detail = f"weights_only=True said: {globals_[0]}" if globals_ else "a raw pickle stream, not a torch.save file"
        raise NasError(f"{p}: refused to load: the file contains pickled Python objects, which could run code "
                       f"({detail}). Only checkpoints written by `nas train` are "
                       "accepted; retrain, or re-save the state_dict from a trusted session") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise NasError(f"{p}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                       ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        tag = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NasError(f"{p}: not a nas checkpoint (expected format {FORMAT!r}, got {tag!r})")
    # weights_only stops code, not nonsense: a hand-edited file must fail here, not as a KeyError deep in a caller
    meta = ckpt.get("meta")
    missing = [k for k in ("model", "meta") if not isinstance(ckpt.get(k), dict)]
    missing += [f"meta.{k}" for k in META_KEYS if isinstance(meta, dict) and k not in meta]
    if missing:
        raise NasError(f"{p}: damaged nas checkpoint: missing or not a mapping: {', '.join(missing)}")
    for k in ("model", "ema"):
        if isinstance(ckpt.get(k), dict):
            ckpt[k] = migrate_state_dict(ckpt[k])
    return ckpt


def detector_from_meta(meta: dict[str, Any], source: str = "<checkpoint>") -> Detector:
    arch = loads_arch(meta["arch_yaml"], source)
    head = HeadConfig(neck=meta["neck"], width=meta["width"], depth=meta["depth"], num_classes=meta["num_classes"],
                      reg_max=meta["reg_max"], act=meta.get("act", "silu"))  # checkpoints before "act" was saved
    return Detector(arch, head)


def load_detector(path: str | Path, ema: bool = True) -> Detector:
    """The Detector saved in a checkpoint, with its EMA weights (or the raw ones with ema=False), in eval mode."""
    ckpt = load_checkpoint(path)
    model = detector_from_meta(ckpt["meta"], str(path))
    model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    return model.eval()

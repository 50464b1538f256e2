"""The site profile: one model's BatchNorm statistics re-estimated on one archive (medclf.model.adapt
fits them), as a small .npz file named by the sha256 of its content. Written whole or not at all, read
with every check (format, model id, arrays), and applied to a network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from medclf import storage
from medclf.errors import UserError

PROFILE_FORMAT = "medclf-site-profile/1"
PROFILE_SUFFIX = ".npz"
HEADER_KEY = "__header__"  # the JSON header, stored as a uint8 array inside the .npz (one file to move)


class AdaptError(UserError):
    pass


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats


@dataclass
class SiteProfile:
    """Adapted statistics of one model for one archive. `profile_id`: sha256 of the content (header
    without the id, then each array's name, dtype, shape and bytes, in name order)."""

    model_id: str
    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    n_images: int
    seed: Optional[int]
    passes: int
    """Passes over the sample (one per adapted layer)."""
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = ""
    """What the sample was drawn from (input path), for the reader; part of the id."""
    extra: dict = field(default_factory=dict)
    """Room for later fields (few-shot temperature, threshold: issue 32 part B); part of the id."""
    profile_id: str = ""

    @property
    def layers(self) -> list[str]:
        return sorted(self.stats)

    def header(self) -> dict:
        return {"format": PROFILE_FORMAT, "model_id": self.model_id, "n_images": int(self.n_images),
                "seed": self.seed, "passes": int(self.passes), "layers": self.layers,
                "skipped": dict(sorted(self.skipped.items())), "source": self.source, "extra": self.extra}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (mean, var) in self.stats.items():
            out[f"{name}.running_mean"] = np.ascontiguousarray(mean, np.float32)
            out[f"{name}.running_var"] = np.ascontiguousarray(var, np.float32)
        return out

    def content_id(self) -> str:
        h = hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode())
        for key, arr in sorted(self.arrays().items()):
            h.update(f"\0{key}\0{arr.dtype.str}\0{arr.shape}\0".encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        self.profile_id = self.content_id()
        header = {**self.header(), "profile_id": self.profile_id}
        buf = io.BytesIO()
        np.savez(buf, **{HEADER_KEY: np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)},
                 **self.arrays())
        return buf.getvalue()

    def summary(self) -> str:
        return (f"site profile {self.profile_id[:12]} for {self.model_id}: {len(self.stats)} BatchNorm layer(s) "
                f"adapted on {self.n_images} image(s) (seed {self.seed}), "
                f"{len(self.skipped)} skipped")


def write_profile(profile: SiteProfile, folder: str, fault_stage: Optional[str] = None) -> str:
    """Write `profile` as `<folder>/<profile id>.npz` and return its path. Never half-written: locally
    to a hidden temporary name then renamed; on object storage in one PUT. An identical profile already
    there (same id, so same content) is kept."""
    data = profile.to_bytes()
    dest = storage.join(folder, profile.profile_id + PROFILE_SUFFIX)
    if storage.is_remote(dest):
        storage.write_bytes(dest, data)
        return dest
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{profile.profile_id[:12]}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fault(fault_stage, "profile_written")
    os.replace(tmp, dest)
    return dest


def _fault(stage: Optional[str], here: str) -> None:
    """MEDCLF_ADAPT_FAULT=<stage>: die (SIGKILL-like, no cleanup) there; for the killed-pass test."""
    if (stage or os.environ.get("MEDCLF_ADAPT_FAULT")) == here:
        os._exit(137)


def read_profile(path: str, model_id: Optional[str] = None) -> SiteProfile:
    """Load a site profile; its content must hash to its id, and (given) it must be `model_id`'s."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise AdaptError(f"site profile not found: {path}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(arrays.pop(HEADER_KEY).tobytes().decode())
    except Exception as exc:
        raise AdaptError(f"{path}: not a readable site profile ({type(exc).__name__}: {exc})") from None
    if header.get("format") != PROFILE_FORMAT:
        raise AdaptError(f"{path}: format {header.get('format')!r} is not {PROFILE_FORMAT!r}")
    stats = {}
    for name in header.get("layers", []):
        try:
            stats[name] = (arrays[f"{name}.running_mean"], arrays[f"{name}.running_var"])
        except KeyError:
            raise AdaptError(f"{path}: lacks the statistics of layer {name!r}") from None
    profile = SiteProfile(header["model_id"], stats, header["n_images"], header.get("seed"), header["passes"],
                          header.get("skipped", {}), header.get("source", ""), header.get("extra", {}))
    profile.profile_id = profile.content_id()
    if profile.profile_id != header.get("profile_id"):
        raise AdaptError(f"{path}: its content hashes to {profile.profile_id[:12]}, not the id it records "
                         f"({str(header.get('profile_id'))[:12]}); the file was altered")
    if model_id is not None and profile.model_id != model_id:
        raise AdaptError(f"{path}: this site profile belongs to model {profile.model_id}, not {model_id}")
    return profile


def apply_profile(model: nn.Module, profile: SiteProfile) -> nn.Module:
    """Set the profile's statistics into `model` (in place; returned). Layer names and shapes are checked."""
    from medclf.model.networks import plain_model

    layers = dict(plain_model(model).named_modules())
    for name, (mean, var) in profile.stats.items():
        bn = layers.get(name)
        if bn is None or not is_batchnorm(bn):
            raise AdaptError(f"site profile {profile.profile_id[:12]}: the model has no BatchNorm layer {name!r}")
        if tuple(mean.shape) != tuple(bn.running_mean.shape):
            raise AdaptError(f"site profile {profile.profile_id[:12]}: layer {name!r} has {mean.shape[0]} channels, "
                             f"the model {bn.running_mean.shape[0]}")
        bn.running_mean.copy_(torch.from_numpy(np.asarray(mean)).to(bn.running_mean))
        bn.running_var.copy_(torch.from_numpy(np.asarray(var)).to(bn.running_var))
    return model


def profile_for(card, path: str) -> SiteProfile:
    """`path` read as the site profile of the model `card` describes: refused for another model's profile,
    an altered one, or an ensemble (label-free adaptation is not offered for ensembles)."""
    from medclf.model.ensemble import ENSEMBLE_ARCH

    if card.arch == ENSEMBLE_ARCH:
        raise AdaptError(f"{path}: a site profile cannot be applied to an ensemble ({card.model_id}): label-free "
                         "adaptation is not offered for ensembles")
    return read_profile(path, card.model_id)


def adapt_network(model: nn.Module, card, path: str) -> str:
    """Set the site profile at `path` (checked by profile_for) into `model`, in place; returns its id.
    Scoring, serving, Grad-CAM and export all adapt through here, so they answer alike."""
    profile = profile_for(card, path)
    apply_profile(model, profile)
    return profile.profile_id

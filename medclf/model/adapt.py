"""Label-free site adaptation: BatchNorm statistics re-estimated on a new archive's own images (AdaBN,
Li et al. 2016), stored as a *site profile*. Pure torch; no Ray, no labels.

Which layers are adapted, and why:
  * a BatchNorm layer whose running statistics were fitted on the training archive is adapted;
  * a BatchNorm layer inside a part frozen by `model.transfer` (`freeze_first:N`, `feature_extractor`)
    is skipped: its statistics are ImageNet's (or the init's) and never described the training data,
    so the layers after it learned to read *those* statistics. Re-estimating them wrecked the
    head-only model in issue 32 (AUC 0.943 -> 0.853);
  * a model without BatchNorm (or with every BatchNorm frozen) is left as it is: adaptation is a
    no-op that says so (`FittedStats.adapted` empty, `note` says why).

The statistics do not depend on how the sample is batched: the model stays in eval mode (each image
goes through the network on its own statistics, never a batch's), and a hook on the adapted layer's
input accumulates exact per-channel sums and sums of squares over the whole sample in float64, one
layer per pass in forward order (see fit_bn_statistics for why not all layers at once).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Optional

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


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats


def adaptable_layers(model: nn.Module, arch: str, transfer: str) -> tuple[list[str], dict[str, str]]:
    """(names of the BatchNorm layers to adapt, {skipped name: why}) of the plain network.

    The frozen parts are found with the training's own rule (medclf.model.artifact.apply_transfer_mode),
    applied to a copy so the caller's model keeps its requires_grad flags."""
    from medclf.model.artifact import apply_transfer_mode, plain_model

    net = plain_model(model)
    twin = copy.deepcopy(net)
    frozen = apply_transfer_mode(twin, arch, transfer or "finetune")
    frozen_ids = {id(m) for part in frozen for m in part.modules()}
    twin_names = {id(m): name for name, m in twin.named_modules()}
    frozen_names = {twin_names[i] for i in frozen_ids if i in twin_names}
    adapt, skipped = [], {}
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats:
                skipped[name] = "keeps no running statistics"
            elif name in frozen_names:
                skipped[name] = (f"frozen by model.transfer={transfer}: its statistics are the pretrained "
                                 "weights', never the training archive's")
            else:
                adapt.append(name)
    return adapt, skipped


@dataclass
class FittedStats:
    """The outcome of a fit: per adapted layer its running mean and variance (float32, as the model stores)."""

    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    adapted: list[str]
    skipped: dict[str, str]
    n_images: int
    passes: int
    last_change: float
    """Largest |change| of a running mean or std against the model's own (in units of its std)."""
    note: str = ""


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has seen its input: the rest of the forward is not needed."""


def fit_bn_statistics(model: nn.Module, arch: str, transfer: str, batches, passes: Optional[int] = None) -> FittedStats:
    """Re-estimate the running statistics of the adaptable BatchNorm layers of `model` (modified in place,
    left in eval mode) from `batches`: a callable returning the same iterable of model-input tensors
    (N, 3, S, S), in the same order, each time it is called (once per pass).

    Exact, layer after layer: the pass for a layer accumulates its input with every earlier layer
    already set to its final statistics, and stops the forward there. Updating every layer at once and
    repeating (2-3 passes) does not converge in general: on a SmallCNN it oscillated (change 0.4, 13.6,
    1.8, 248 std units in passes 1-4), because each layer's statistics then describe its input under
    the previous, wrong, statistics of the layers before it. To keep the cost near that of 2-3 full
    passes, the output of the last finished top-level block (medclf.model.artifact.backbone_blocks) is
    kept in memory and fed in place of the blocks before it (BlockCache).
    `passes`: stop after that many layers (tests of a partial fit); default all."""
    from medclf.model.artifact import plain_model

    net = plain_model(model)
    adapt, skipped = adaptable_layers(model, arch, transfer)
    if not adapt:
        note = ("the model has no BatchNorm layer" if not skipped else
                f"every BatchNorm layer ({len(skipped)}) is frozen by model.transfer={transfer}")
        return FittedStats({}, [], skipped, 0, 0, 0.0, f"nothing to adapt: {note}")
    layers = dict(net.named_modules())
    model.eval()
    order = _forward_order(model, layers, adapt, batches)[:passes]
    cache = BlockCache(model, arch)
    n_images, change = 0, 0.0
    for name in order:
        bn = layers[name]
        cache.advance_to(bn, batches)
        acc: dict[str, list] = {}
        hook = bn.register_forward_pre_hook(_accumulator(name, bn, acc, stop=True))
        try:
            n_images = cache.run(batches)
        finally:
            hook.remove()
        if n_images == 0:
            raise AdaptError("adaptation sample is empty: no image decoded")
        shift, s1, s2, n = acc[name]
        d = s1 / n
        mean = shift + d
        var = (s2 / n - d * d).clamp_min(0.0) * (n / max(n - 1, 1))  # unbiased, as BatchNorm keeps it
        old_std = (bn.running_var.double() + bn.eps).sqrt()
        change = max(change, float(((mean - bn.running_mean.double()).abs() / old_std).max()),
                     float(((var + bn.eps).sqrt() / old_std - 1).abs().max()))
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    stats = {name: (layers[name].running_mean.detach().cpu().numpy().copy(),
                    layers[name].running_var.detach().cpu().numpy().copy()) for name in order}
    return FittedStats(stats, list(order), skipped, n_images, len(order), change)


class BlockCache:
    """Feeds the model the stored output of its last finished top-level block instead of computing the
    blocks before it again. The blocks are chained by the model's own forward (glue such as a ReLU or
    pooling between blocks still runs); a replaced block returns the stored tensor (the frontier) or a
    placeholder (the blocks before it, whose output the frontier ignores)."""

    def __init__(self, model: nn.Module, arch: str):
        from medclf.model.artifact import backbone_blocks, plain_model

        self.model = model
        self.blocks = backbone_blocks(plain_model(model), arch)
        self.frontier = -1  # blocks[: frontier + 1] are replaced by the cache
        self.outputs: list[torch.Tensor] = []
        self.last_called: Optional[nn.Module] = None

    def _block_of(self, module: nn.Module) -> int:
        for i, block in enumerate(self.blocks):
            if any(m is module for m in block.modules()):
                return i
        return len(self.blocks)  # after every block (e.g. a head's BatchNorm)

    def advance_to(self, bn: nn.Module, batches) -> None:
        """Cache the output of the last block before `bn`'s block (every layer in it is final by now)."""
        target = self._block_of(bn) - 1
        while self.frontier < target:
            self._cache_block(self.frontier + 1, batches)

    def _callables(self, block: nn.Module) -> list[nn.Module]:
        return list(block) if isinstance(block, nn.ModuleList) else [block]

    def _cache_block(self, index: int, batches) -> None:
        block = self.blocks[index]
        called: list[nn.Module] = []
        outputs: list[torch.Tensor] = []

        def note(module, args, out):
            called.append(module)

        notes = [m.register_forward_hook(note) for m in self._callables(block)]
        try:
            self.run(batches, probe=True)  # which module of the block runs last (what the next block reads)
        finally:
            for h in notes:
                h.remove()
        last = called[-1]

        def keep(module, args, out):
            outputs.append(out.detach().clone())
            raise _Stop

        hook = last.register_forward_hook(keep)
        try:
            self.run(batches)
        finally:
            hook.remove()
        self.frontier, self.outputs, self.last_called = index, outputs, last

    def run(self, batches, probe: bool = False) -> int:
        """One pass of the sample with the cached blocks replaced; returns the number of images.
        `probe`: one batch only."""
        count = 0
        patched = self._patch()
        try:
            with torch.inference_mode():
                for i, x in enumerate(batches()):
                    self._batch = i
                    try:
                        self.model(x)
                    except _Stop:
                        pass
                    count += x.shape[0]
                    if probe:
                        break
        finally:
            for module in patched:
                del module.forward  # back to the class's forward
        return count

    def _patch(self) -> list[nn.Module]:
        if self.frontier < 0:
            return []
        patched = []
        for block in self.blocks[: self.frontier + 1]:
            for module in self._callables(block):
                if module is self.last_called:
                    module.forward = lambda *a, **k: self.outputs[self._batch]
                else:
                    module.forward = lambda x, *a, **k: x.new_zeros((x.shape[0], 1, 1, 1))
                patched.append(module)
        return patched


def _forward_order(model: nn.Module, layers: dict, adapt: list[str], batches) -> list[str]:
    """The adaptable layers in the order the forward pass reaches them (one image of the sample)."""
    seen: list[str] = []
    hooks = [layers[name].register_forward_pre_hook(lambda m, a, name=name: seen.append(name)) for name in adapt]
    try:
        with torch.inference_mode():
            model(next(iter(batches()))[:1])
    except StopIteration:
        raise AdaptError("adaptation sample is empty: no image decoded") from None
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(seen))


def _accumulator(name: str, bn: nn.Module, acc: dict, stop: bool = False):
    """Forward pre-hook: add the layer input's per-channel sums (shifted by the current running mean,
    so float64 sums of squares keep their precision) to `acc[name]`."""

    def hook(module, args):
        x = args[0].detach().double()
        dims = [0, *range(2, x.dim())]
        if name not in acc:
            acc[name] = [module.running_mean.detach().double().clone(), 0.0, 0.0, 0]
        shift = acc[name][0]
        xc = x - shift.view(1, -1, *([1] * (x.dim() - 2)))
        acc[name][1] = acc[name][1] + xc.sum(dims)
        acc[name][2] = acc[name][2] + (xc * xc).sum(dims)
        acc[name][3] += x.numel() // x.shape[1]
        if stop:
            raise _Stop

    return hook


# ---------------------------------------------------------------- the site profile


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


def profile_from_fit(fit: FittedStats, model_id: str, seed: Optional[int], source: str = "") -> SiteProfile:
    profile = SiteProfile(model_id, fit.stats, fit.n_images, seed, fit.passes, fit.skipped, source)
    profile.profile_id = profile.content_id()
    return profile


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
    from medclf.model.artifact import plain_model

    layers = dict(plain_model(model).named_modules())
    for name, (mean, var) in profile.stats.items():
        bn = layers.get(name)
        if bn is None or not _is_bn(bn):
            raise AdaptError(f"site profile {profile.profile_id[:12]}: the model has no BatchNorm layer {name!r}")
        if tuple(mean.shape) != tuple(bn.running_mean.shape):
            raise AdaptError(f"site profile {profile.profile_id[:12]}: layer {name!r} has {mean.shape[0]} channels, "
                             f"the model {bn.running_mean.shape[0]}")
        bn.running_mean.copy_(torch.from_numpy(np.asarray(mean)).to(bn.running_mean))
        bn.running_var.copy_(torch.from_numpy(np.asarray(var)).to(bn.running_var))
    return model


def transfer_mode(card) -> str:
    """The `model.transfer` the artifact was trained with (its stored config); finetune when absent."""
    return str((card.config or {}).get("model", {}).get("transfer", "finetune") or "finetune")


def tensor_batches(pixels: np.ndarray, batch_size: int = 64):
    """A `batches` callable for fit_bn_statistics over preprocessed one-channel images (N, 1, S, S)."""
    from medclf.imaging.preprocess import to_model_input

    def batches() -> Iterable[torch.Tensor]:
        for i in range(0, len(pixels), batch_size):
            yield to_model_input(torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size])))

    return batches


def fit_profile(model: nn.Module, card, pixels: np.ndarray, seed: Optional[int], passes: Optional[int] = None,
                source: str = "", batch_size: int = 64) -> tuple[SiteProfile, FittedStats]:
    """Fit a site profile for the artifact (`model`, `card`) on preprocessed images; `model` is adapted
    in place. A model with nothing to adapt gives a profile with no layers (fit.note says why)."""
    fit = fit_bn_statistics(model, card.arch, transfer_mode(card), tensor_batches(pixels, batch_size), passes)
    return profile_from_fit(fit, card.model_id, seed, source), fit

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
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from medclf.model.site_profile import AdaptError, SiteProfile



def adaptable_layers(model: nn.Module, arch: str, transfer: str) -> tuple[list[str], dict[str, str]]:
    """(names of the BatchNorm layers to adapt, {skipped name: why}) of the plain network.

    The frozen parts are found with the training's own rule (medclf.model.artifact.apply_transfer_mode),
    applied to a copy so the caller's model keeps its requires_grad flags."""
    from medclf.model.networks import apply_transfer_mode, plain_model

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


def fit_bn_statistics(model: nn.Module, arch: str, transfer: str, batches, passes: Optional[int] = None,
                      weights: Optional[np.ndarray] = None) -> FittedStats:
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
    `passes`: stop after that many layers (tests of a partial fit); default all.
    `weights`: one non-negative weight per image, in the order `batches` yields them: each image's
    activations count that much in the statistics (sample_weights: the sample re-weighted to another
    class prevalence). Scaled to mean 1; default equal."""
    from medclf.model.networks import plain_model

    net = plain_model(model)
    adapt, skipped = adaptable_layers(model, arch, transfer)
    if not adapt:
        note = ("the model has no BatchNorm layer" if not skipped else
                f"every BatchNorm layer ({len(skipped)}) is frozen by model.transfer={transfer}")
        return FittedStats({}, [], skipped, 0, 0, 0.0, f"nothing to adapt: {note}")
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 1 or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise AdaptError("adaptation weights must be finite, non-negative and not all zero")
        weights = torch.from_numpy(weights / weights.mean())
    layers = dict(net.named_modules())
    model.eval()
    order = _forward_order(model, layers, adapt, batches)[:passes]
    cache = BlockCache(model, arch)
    n_images, change = 0, 0.0
    for name in order:
        bn = layers[name]
        cache.advance_to(bn, batches)
        acc: dict[str, list] = {}
        hook = bn.register_forward_pre_hook(_accumulator(name, bn, acc, stop=True, weights=weights))
        try:
            n_images = cache.run(batches)
        finally:
            hook.remove()
        if n_images == 0:
            raise AdaptError("adaptation sample is empty: no image decoded")
        if weights is not None and n_images != len(weights):
            raise AdaptError(f"adaptation weights: {len(weights)} for a sample of {n_images} images")
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
        from medclf.model.networks import backbone_blocks, plain_model

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


def _accumulator(name: str, bn: nn.Module, acc: dict, stop: bool = False, weights: Optional[torch.Tensor] = None):
    """Forward pre-hook: add the layer input's per-channel sums (shifted by the current running mean,
    so float64 sums of squares keep their precision) to `acc[name]`; with `weights`, each image's
    sums times its weight (images are counted off in the order the pass sees them)."""
    seen = [0]

    def hook(module, args):
        x = args[0].detach().double()
        dims = [0, *range(2, x.dim())]
        if name not in acc:
            acc[name] = [module.running_mean.detach().double().clone(), 0.0, 0.0, 0]
        shift = acc[name][0]
        xc = x - shift.view(1, -1, *([1] * (x.dim() - 2)))
        per_image = x.numel() // (x.shape[0] * x.shape[1])
        if weights is None:
            acc[name][1] = acc[name][1] + xc.sum(dims)
            acc[name][2] = acc[name][2] + (xc * xc).sum(dims)
            acc[name][3] += x.shape[0] * per_image
        else:
            w = weights[seen[0]:seen[0] + x.shape[0]]
            if len(w) != x.shape[0]:
                raise AdaptError(f"adaptation weights: {len(weights)} for a sample of more images")
            w = w.view(-1, *([1] * (x.dim() - 1)))
            acc[name][1] = acc[name][1] + (w * xc).sum(dims)
            acc[name][2] = acc[name][2] + (w * xc * xc).sum(dims)
            acc[name][3] += float(w.sum()) * per_image
        seen[0] += x.shape[0]
        if stop:
            raise _Stop

    return hook


def profile_from_fit(fit: FittedStats, model_id: str, seed: Optional[int], source: str = "",
                     extra: Optional[dict] = None) -> SiteProfile:
    profile = SiteProfile(model_id, fit.stats, fit.n_images, seed, fit.passes, fit.skipped, source, dict(extra or {}))
    profile.profile_id = profile.content_id()
    return profile


WEIGHTINGS = ("none", "prior")


def sample_weights(model: nn.Module, card, pixels: np.ndarray, weighting: str) -> tuple[Optional[np.ndarray], dict]:
    """(weights for fit_bn_statistics, what was done) for an adaptation sample of preprocessed images.

    `none` (what scoring uses): equal weights, an empty record. `prior` (benchmarks/adapt_prevalence.py):
    the sample re-weighted to the training split's class shares, with the unadapted model's calibrated
    posteriors and EM (medclf.model.prior_shift.prevalence_weights). Unweighted statistics carry the
    archive's prevalence into the answers: on pneumonia archives drawn at 25% positives from one validation
    part, plain `bn` took specificity at the stored threshold from 1.00 to 0.73-0.79, and `prior` kept it
    at 1.00; but it moved sensitivity with prevalence twice as much as no adaptation, so by the rule written
    before that run it is not in scoring (docs/adaptation.md). A card that does not record the class shares
    it needs is fitted unweighted, and the record says why."""
    from medclf.model.prior_shift import prevalence_weights

    if weighting not in WEIGHTINGS:
        raise AdaptError(f"unknown adaptation weighting {weighting!r}; one of {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return None, {}
    try:
        probs, pi_cal, pi_train = sample_posteriors(model, card, pixels)
    except ValueError as e:
        return None, {"weighting": "none", "why": f"prior weighting not possible: {e}"}
    weights, est = prevalence_weights(probs, pi_cal, pi_train)
    return weights, {"weighting": "prior", "sample_prior": [round(float(v), 4) for v in est.prior],
                     "target_prior": [round(float(v), 4) for v in pi_train], "classes": list(card.classes),
                     "weight_range": [round(float(weights.min()), 4), round(float(weights.max()), 4)]}


def sample_posteriors(model: nn.Module, card, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibrated posteriors of the unadapted `model` on the sample, the prior they were calibrated under,
    the training split's class shares). ValueError when the card does not record the class shares."""
    from medclf.model.networks import class_probabilities
    from medclf.model.prior_shift import calibration_prior, training_prior

    pi_cal, pi_train = calibration_prior(card), training_prior(card)
    model.eval()  # a train-mode forward would move the running statistics it is about to estimate from
    with torch.inference_mode():
        probs = np.concatenate([class_probabilities(model(x), card.temperature).numpy()
                                for x in tensor_batches(pixels)()])
    return probs, pi_cal, pi_train


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
                source: str = "", batch_size: int = 64, weighting: str = "none") -> tuple[SiteProfile, FittedStats]:
    """Fit a site profile for the artifact (`model`, `card`) on preprocessed images; `model` is adapted
    in place. `weighting`: sample_weights'; the profile's `extra` records a weighted fit.
    A model with nothing to adapt gives a profile with no layers (fit.note says why)."""
    # One estimate, from the unadapted model. Re-estimating with the adapted model's posteriors and fitting
    # again was tried and runs away: weighting toward the training prevalence moves the statistics so that the
    # next estimate errs further the same way (phantoms, a 10%-positive archive under gamma 0.5 + contrast 0.6:
    # 1.0, then 0.63, 0.75, 0.85, 0.93, 0.98, 1.0 over rounds). Where the unadapted model misreads an archive
    # that badly, the estimate saturates, the weights come out flat, and the fit is plain `bn`'s.
    weights, how = sample_weights(model, card, pixels, weighting)
    fit = fit_bn_statistics(model, card.arch, transfer_mode(card), tensor_batches(pixels, batch_size), passes,
                            weights)
    return profile_from_fit(fit, card.model_id, seed, source, how), fit

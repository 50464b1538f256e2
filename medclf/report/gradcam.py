"""Grad-CAM heatmaps: where in a scan the model found its evidence for a class.

Grad-CAM (Selvaraju et al. 2017): take the activations A of a convolutional layer and the
gradient of the class score (the logit) with respect to them; weight each channel by its mean
gradient, sum, ReLU, upsample to the input size. Small enough to own (a forward hook and one
autograd.grad call), so no extra dependency: pytorch-grad-cam pulls in OpenCV, captum a
framework we would use one class of.

Images go through the same decode + `preprocess_gray` as scoring (the Ray Data stage
`medclf.imaging.stage.images_dataset`), and an actor pool of `Explainer`s computes the maps, so
explaining scales like scoring. Per image it writes, under `<output>/heatmaps/`:
    <stem>-<checksum8>.png   the preprocessed image and the heatmap overlay side by side
    <stem>-<checksum8>.npy   the heatmap, float32 (S, S) in [0, 1], in the model-input frame
and `<output>/explanations.parquet` indexes them (EXPLANATION_COLUMNS).
"""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from medclf import storage
from medclf.model.artifact import ModelError, load_artifact, load_card
from medclf.model.ensemble import ENSEMBLE_ARCH, Ensemble
from medclf.model.networks import build_model, class_probabilities, plain_model
from medclf.model.site_profile import adapt_network, profile_for
from medclf.imaging.preprocess import denormalize, to_model_input
from medclf.imaging.privacy import display_name
from medclf.imaging.stage import text_or_none

log = logging.getLogger(__name__)

# The last convolutional stage is the usual Grad-CAM layer: the most class-specific features
# that still have a spatial layout. The small CNN's last block is 1/16 of the input (4x4 at
# 64 px), too coarse to localise anything, so it uses the block before (1/8).
DEFAULT_LAYERS = {
    "small_cnn": "features.2",
    "resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4",
    "densenet121": "features",
    "efficientnet_b0": "features", "efficientnet_lite0": "_head_act",
    "mobilenet_v3_small": "features", "mobilenet_v3_large": "features",
}

EXPLANATION_COLUMNS = {
    "path": "input file",
    "frame": "1-based frame of a multi-frame DICOM (null for single-image files)",
    "checksum": "sha256 of the file's bytes",
    "model_id": "model that was explained",
    "layer": "layer whose activations were used",
    "target_class": "class whose score was explained",
    "probability": "model probability of target_class",
    "peak_x": "heatmap maximum, fraction of the image width (0 = left edge)",
    "peak_y": "heatmap maximum, fraction of the image height (0 = top edge)",
    "heatmap_png": "side-by-side picture (image | overlay)",
    "heatmap_npy": "heatmap array, float32 (S, S), values in [0, 1]",
    "adaptation_id": "site profile the heatmap was made with (as scoring's rows record it); null: training statistics",
    "status": "ok | error | skipped (not an image) | out_of_scope (another modality, too small: medclf.monitor.ood)",
    "error": "why the file could not be explained",
}


# An ensemble's map is the mean of its members' maps, each at the member's own default layer.
ENSEMBLE_LAYER = "members' default layers"


def default_layer(arch: str) -> str:
    return ENSEMBLE_LAYER if arch == ENSEMBLE_ARCH else DEFAULT_LAYERS.get(arch, "features")


def ensemble_grad_cam(ensemble: Ensemble, x: torch.Tensor, target,
                      temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """grad_cam for an Ensemble: the mean of its members' maps (each at its own default layer and
    normalised as a single model's), for the class the ENSEMBLE's probabilities decide; its probabilities."""
    with torch.no_grad():
        probs = class_probabilities(ensemble(x), temperature).numpy()
    targets = np.asarray(target(probs) if callable(target) else target)
    maps = [grad_cam(ensemble.predicting_member(i), x, default_layer(arch), targets, member_temperature)[0]
            for i, (arch, member_temperature) in enumerate(zip(ensemble.archs, ensemble.temperatures))]
    return np.mean(maps, axis=0).astype(np.float32), probs, torch.as_tensor(targets).long().numpy()


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str, target,
             temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps (N, S, S) in [0, 1], calibrated probs (N, C) and the explained class per image (N,).

    `x` is the 3-channel model input (N, 3, S, S); `model` is in eval mode. `target`: class
    indices (N,), or a function probs -> indices (the decision), applied to this same forward pass.
    `temperature`: the model card's (probabilities only; the explained logit is unscaled, and a
    positive scale does not move a Grad-CAM map). An Ensemble: `ensemble_grad_cam` (`layer` unused).
    """
    if isinstance(plain_model(model), Ensemble):
        return ensemble_grad_cam(plain_model(model), x, target, temperature)
    modules = dict(plain_model(model).named_modules())
    if layer not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)][-3:]
        raise ModelError(f"no layer '{layer}' in the model; e.g. {convs} or a block name like 'layer4'")
    captured: list[torch.Tensor] = []
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            # The input asks for gradients so activations carry them even when the weights do not.
            logits = model(x.detach().requires_grad_(True))
            probs = class_probabilities(logits.detach(), temperature).numpy()
            target = torch.as_tensor(target(probs) if callable(target) else target).long()
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, captured[0])
    finally:
        handle.remove()
    acts = captured[0].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts).sum(dim=1, keepdim=True))
    if len(cam) == 2 * len(x):  # MirrorMean: add the mirrored half's map, mirrored back
        cam = cam[:len(x)] + cam[len(x):].flip(-1)
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).numpy().astype(np.float32), probs, target.numpy()


def overlay_png(gray01: np.ndarray, heat: np.ndarray, caption: str, min_side: int = 256) -> bytes:
    """The image and the heatmap over it, side by side, upscaled to at least `min_side` px."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    base = np.repeat(gray01[..., None], 3, axis=2)
    colour = colormaps["jet"](heat)[..., :3]
    alpha = 0.45 * heat[..., None]  # weak evidence leaves the anatomy visible
    blended = base * (1 - alpha) + colour * alpha
    pair = np.concatenate([base, np.ones((base.shape[0], 2, 3)), blended], axis=1)
    img = Image.fromarray((pair * 255).astype(np.uint8))
    scale = max(1, int(np.ceil(min_side / gray01.shape[0])))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST if scale > 1 else Image.BILINEAR)
    canvas = Image.new("RGB", (img.width, img.height + 18), "white")
    canvas.paste(img, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


class Explainer:
    """Ray Data actor: holds the model; a batch of preprocessed images in, heatmap files + index rows out."""

    def __init__(self, model_path: str, output: str, layer: Optional[str] = None, target: str = "predicted",
                 threads: Optional[int] = None, show_paths: bool = False, site_profile: Optional[str] = None):
        if threads:
            torch.set_num_threads(threads)
        self.model, self.card = load_artifact(model_path)
        # The statistics scoring used (medclf score with that profile), so the map explains the same answer.
        self.adaptation_id = adapt_network(self.model, self.card, site_profile) if site_profile else None
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients are needed w.r.t. activations only
        self.layer = layer or default_layer(self.card.arch)
        self.output = output
        self.target = target
        self.show_paths = show_paths

    def _targets(self, probs: np.ndarray) -> np.ndarray:
        card = self.card
        if self.target == "predicted":
            if card.positive_index is not None and card.threshold is not None and len(card.classes) == 2:
                pos = card.positive_index
                return np.where(probs[:, pos] >= card.threshold, pos, 1 - pos)
            return probs.argmax(axis=1)
        return np.full(len(probs), card.classes.index(self.target))

    def __call__(self, batch: dict) -> dict:
        errors = text_or_none(batch["error"])
        statuses = text_or_none(batch["status"])  # set by the decode task for rows it could not prepare
        frames = [None if f < 0 else int(f) for f in batch["frame"]]
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        rows = {k: [None] * n for k in EXPLANATION_COLUMNS}
        ok = [i for i, s in enumerate(statuses) if s is None]
        if ok:
            gray = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            x = to_model_input(gray).contiguous()
            heat, probs, targets = grad_cam(self.model, x, self.layer, self._targets, self.card.temperature)
            spec = self.card.preprocess_spec
            for j, i in enumerate(ok):
                cls = self.card.classes[int(targets[j])]
                stem = display_name(paths[i], self.show_paths).rsplit(".", 1)[0]  # no patient names by default
                name = f"{stem}-{str(batch['checksum'][i])[:8]}" + ("" if frames[i] is None else f"-f{frames[i]}")
                png = storage.join(self.output, "heatmaps", f"{name}.png")
                npy = storage.join(self.output, "heatmaps", f"{name}.npy")
                where = "" if frames[i] is None else f" frame {frames[i]}"
                caption = f"{stem}{where}: {cls} p={probs[j, targets[j]]:.3f} (Grad-CAM {self.layer})"
                storage.write_bytes(png, overlay_png(denormalize(gray[j].numpy(), spec), heat[j], caption))
                buf = io.BytesIO()
                np.save(buf, heat[j])
                storage.write_bytes(npy, buf.getvalue())
                py, px = np.unravel_index(int(heat[j].argmax()), heat[j].shape)
                size = heat[j].shape[0]
                rows["target_class"][i], rows["probability"][i] = cls, float(probs[j, targets[j]])
                rows["peak_x"][i], rows["peak_y"][i] = (px + 0.5) / size, (py + 0.5) / size
                rows["heatmap_png"][i], rows["heatmap_npy"][i] = png, npy
        for i in range(n):
            rows["path"][i], rows["frame"][i] = paths[i], frames[i]
            rows["checksum"][i] = text_or_none(batch["checksum"])[i]
            rows["model_id"][i] = self.card.model_id
            rows["layer"][i] = self.layer
            rows["adaptation_id"][i] = self.adaptation_id
            rows["status"][i] = "ok" if statuses[i] is None else statuses[i]
            rows["error"][i] = errors[i]
        for key in ("probability", "peak_x", "peak_y"):
            rows[key] = np.array([np.nan if v is None else v for v in rows[key]], np.float64)
        return rows


def run_explain(paths: list[str], model_path: str, output: str, layer: Optional[str] = None,
                target: str = "predicted", batch_size: int = 16, num_actors: int = 1, cpus_per_actor: float = 1.0,
                decode_batch_size: int = 16, frames: str = "all", show_paths: bool = False,
                site_profile: Optional[str] = None) -> pd.DataFrame:
    """Grad-CAM for `paths` (Ray Data: decode tasks -> Explainer actors); returns and writes the index.
    `site_profile`: the adapted statistics a scoring run used (medclf.model.site_profile)."""
    import ray.data

    from medclf.imaging.stage import images_dataset
    from medclf.model.records import input_gate

    card = load_card(model_path)  # fail fast: a bad artifact, an unknown layer or class
    if target != "predicted" and target not in card.classes:
        raise ModelError(f"target '{target}' is not one of the model's classes {card.classes} (or 'predicted')")
    if layer is not None and card.arch == ENSEMBLE_ARCH:
        raise ModelError(f"--layer is not offered for an ensemble: its map is the mean of its members' maps, each "
                         f"at the member's default layer ({ENSEMBLE_LAYER})")
    if layer is not None:
        probe = build_model(card.arch, len(card.classes))  # layer names only: no weights read
        if layer not in dict(probe.named_modules()):
            raise ModelError(f"no layer '{layer}' in {card.arch}; default for it: '{default_layer(card.arch)}'")
    if site_profile:  # another model's profile, an altered one, or an ensemble: refused before any Ray work
        profile_for(card, site_profile)
    if not paths:
        raise FileNotFoundError("nothing to explain: no input files")
    # Files the model's domain excludes by header (another modality, too small) get no heatmap: an
    # explanation would present them as in scope. (`--flagged` takes status-ok rows only.)
    ds = images_dataset(paths, card.preprocess_spec, decode_batch_size, frames=frames, gate=input_gate(card))
    ds = ds.map_batches(
        Explainer,
        fn_constructor_kwargs={"model_path": model_path, "output": output, "layer": layer, "target": target,
                               "threads": max(1, int(cpus_per_actor)), "show_paths": show_paths,
                               "site_profile": site_profile},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
    )
    index = pd.concat([pd.DataFrame(b) for b in ds.iter_batches(batch_size=None, batch_format="pandas")],
                      ignore_index=True)
    index = index[list(EXPLANATION_COLUMNS)].sort_values(["path", "frame"], ignore_index=True)
    index["frame"] = index["frame"].astype("Int32")  # nullable: null for single-image files
    storage.makedirs(output)
    storage.write_bytes(storage.join(output, "explanations.parquet"), index.to_parquet(index=False))
    return index


def flagged_paths(predictions: str, model_id: str, positive_class: str, run_id: Optional[str] = None) -> list[str]:
    """Files this model scored as `positive_class` (in one scoring run, if `run_id` is given)."""
    from medclf.data.predictions import read_predictions

    pred = read_predictions(predictions, columns=["path", "predicted_label", "model_id", "run_id", "status"])
    keep = (pred["model_id"] == model_id) & (pred["status"] == "ok") & (pred["predicted_label"] == positive_class)
    if run_id is not None:
        keep &= pred["run_id"] == run_id
    return sorted(pred.loc[keep, "path"].unique().tolist())

"""The few array operations where numpy and torch differ, so that each check on an image (its drift
statistics, medclf.imaging.stats; its content, medclf.imaging.content; its appearance,
medclf.imaging.appearance) is written once and runs on a numpy image in a decode task or on a torch
tensor on the inference actor's GPU (medclf.imaging.device_decode). On numpy these are the calls the
checks always made, so their values there are unchanged."""

from __future__ import annotations

import numpy as np


def is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch")


def as_float32(x):
    return x.float() if is_tensor(x) else np.asarray(x, np.float32)


def as_float64(x):
    return x.double() if is_tensor(x) else np.asarray(x, np.float64)


def clip(x, low: float, high: float):
    return x.clamp(low, high) if is_tensor(x) else np.clip(x, low, high)


def quantile(x, qs):
    """Linear-interpolation quantiles of all of `x` (numpy's default, and torch's)."""
    if is_tensor(x):
        import torch

        return torch.quantile(x.reshape(-1), torch.tensor(qs, dtype=x.dtype, device=x.device))
    return np.quantile(x, qs)


def std(x):
    """Population standard deviation (numpy's default; torch's default would be the sample one)."""
    return x.std(correction=0) if is_tensor(x) else x.std()


def var(x):
    """Population variance (see `std`)."""
    return x.var(correction=0) if is_tensor(x) else x.var()


def diff(x, axis: int):
    return x.diff(dim=axis) if is_tensor(x) else np.diff(x, axis=axis)


def log(x):
    return x.log() if is_tensor(x) else np.log(x)


def sqrt(x):
    return x.sqrt() if is_tensor(x) else np.sqrt(x)


def concat(parts: list):
    """One 1-D vector from scalars and 1-D pieces."""
    if any(is_tensor(p) for p in parts):
        import torch

        ref = next(p for p in parts if is_tensor(p))
        return torch.cat([(p if is_tensor(p) else torch.as_tensor(p, device=ref.device)).to(ref.dtype).reshape(-1)
                          for p in parts])
    return np.r_[tuple(parts)]


def ratio(num, den):
    """num / den, NaN where den <= 0."""
    if is_tensor(den):
        import torch

        return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(den, float("nan")))
    return float(num) / float(den) if den > 0 else float("nan")


def nanmean(values: list):
    """Mean of the values that are not NaN; NaN when none is (or there are none)."""
    if values and is_tensor(values[0]):
        import torch

        return torch.stack(values).nanmean()
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")

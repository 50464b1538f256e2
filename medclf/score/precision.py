"""Inference precision (`score.precision`, `serve.precision`): the autocast a forward pass runs under.

One rule for the paths that answer (batch scoring's actors and the endpoint's replicas), so they
answer alike. `auto` keeps what scoring always did: float16 autocast on a GPU, float32 on a CPU.
`bfloat16` on a CPU uses oneDNN's native bfloat16 kernels (AVX512-BF16 / AMX): on the 2-core Xeon build
machine the pneumonia model's forward pass ran 1.75x faster, and on 399 Kermany validation films the
positive probability moved by up to 0.078 (99th percentile 0.035) and 1 decision of 399 changed side
(with BatchNorm folded, medclf.model.fold: up to 0.069, 1 decision, 1 out-of-scope call;
benchmarks/precision_agreement.py, docs/performance.md). So it is an opt-in for throughput, never the
default.
"""

from __future__ import annotations

from typing import get_args

from medclf.config.scoring import Precision

PRECISIONS = get_args(Precision)


class PrecisionError(ValueError):
    """The node cannot run the precision the config asks for."""


def cpu_has_bfloat16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(precision: str, device: str):
    """The torch dtype to autocast to on `device` ("cpu"/"cuda"), or None for plain float32."""
    import torch

    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "float32" or (precision == "auto" and device != "cuda"):
        return None
    if precision in ("auto", "float16"):
        if device != "cuda":
            raise PrecisionError("precision float16 needs a GPU (use_gpu: true); on a CPU use bfloat16 or float32")
        return torch.float16
    if device == "cpu" and not cpu_has_bfloat16():
        raise PrecisionError("precision bfloat16: this node's CPU has no native bfloat16 support (oneDNN needs "
                             "AVX512-BF16 or AMX); score with precision float32 (or auto) here")
    return torch.bfloat16

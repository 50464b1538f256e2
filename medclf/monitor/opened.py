"""A model artifact opened once, into the one object every consumer uses: the network, its card, its
out-of-scope domain (medclf.monitor.ood) and its drift reference (medclf.monitor.reference). Each file
of the artifact is read and checked against the card once (medclf.model.artifact.read_artifact).

It lives in the monitor package, not beside the artifact format, because the domain and the reference
are monitor objects: medclf.model stays free of imports from above it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from medclf.model.artifact import ModelCard, read_artifact
from medclf.monitor.ood import Domain, domain_of
from medclf.monitor.reference import Reference, reference_of


@dataclass
class OpenedModel:
    path: str
    card: ModelCard
    model: Optional[nn.Module]
    """The network in eval mode, as it predicts; None when opened with network=False (drift reports)."""
    domain: Optional[Domain]
    """None: an artifact from before the out-of-scope guard."""
    reference: Optional[Reference]
    """None: an artifact from before drift reports."""


def open_model(path: str, device: str = "cpu", network: bool = True) -> OpenedModel:
    """Open the artifact at `path` (local or s3://) once. network=False skips reading the weights."""
    files = read_artifact(path, weights=network)
    return OpenedModel(path, files.card, files.network(device) if network else None, domain_of(files),
                       reference_of(files))

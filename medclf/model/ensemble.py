"""An ensemble as one network: its members' calibrated probabilities averaged, behind the interface of a
single model, so that everything that builds the network from an artifact (scoring, serving, export,
the out-of-scope guard, drift) works on an ensemble unchanged.

The ensemble's card has arch `ensemble`, temperature 1.0 and `config["ensemble"]["members"]`: one entry
per member (arch, temperature, dropout, model_id, test_time_hflip). Its weights are one state_dict, the
members' under `members.<i>.`. Making one from member artifacts (checks, threshold, guard, reference) is
medclf.train.ensemble; this module only knows the network, so medclf.model.artifact can build it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from medclf.errors import ModelError
from medclf.model.networks import build_model, penultimate, predicting_model

ENSEMBLE_ARCH = "ensemble"
MEMBER_FIELDS = ("arch", "temperature", "dropout", "model_id", "test_time_hflip")
# How the members' penultimate features are joined (card: config.ensemble.features). Each member's
# vector is scaled to unit length first, so no member's features outweigh another's in the guard's
# distances: joined raw, a Lite0 + ResNet18 ensemble's guard refused 42/100 breast US images where
# the Lite0 member's half of the same features refused 100/100 (docs/ensembles.md). Cards written before this field
# existed have their guard and reference fitted on the raw join, which they keep.
FEATURES_UNIT_PER_MEMBER = "unit length per member, then joined"
FEATURES_RAW = "joined as they are"


class Ensemble(nn.Module):
    """Members (plain networks), their archs, calibrated temperatures and test-time mirroring.

    forward(x) = log(mean_i softmax(member_i(x) / T_i)): the softmax of it (at temperature 1.0) is
    exactly the mean of the members' calibrated probabilities, and the output is still "logits" to
    every consumer (argmax, threshold on the softmax, ONNX export)."""

    is_ensemble = True  # networks.penultimate dispatches on this without importing this module

    def __init__(self, members: list[nn.Module], archs: list[str], temperatures: list[float],
                 test_time_hflips: list[bool], features: str = FEATURES_UNIT_PER_MEMBER):
        super().__init__()
        if not (len(members) == len(archs) == len(temperatures) == len(test_time_hflips)) or len(members) < 2:
            raise ModelError(f"an ensemble needs at least 2 members, each with an arch, a temperature and "
                             f"test_time_hflip; got {len(members)} member(s)")
        self.members = nn.ModuleList(members)
        self.archs = list(archs)
        self.temperatures = [float(t) for t in temperatures]
        self.test_time_hflips = [bool(h) for h in test_time_hflips]
        if features not in (FEATURES_UNIT_PER_MEMBER, FEATURES_RAW):
            raise ModelError(f"ensemble features {features!r}: expected {FEATURES_UNIT_PER_MEMBER!r} or {FEATURES_RAW!r}")
        self.features = features

    def predicting_member(self, i: int) -> nn.Module:
        """Member i as its own artifact predicts (wrapped in MirrorMean where its card says so)."""
        return predicting_model(self.members[i], self.test_time_hflips[i])

    def _mean_log_probs(self, member_logits: list[torch.Tensor]) -> torch.Tensor:
        """log(mean_i softmax(logits_i / T_i)), computed as a logsumexp of log-softmaxes (stable)."""
        log_probs = torch.stack([torch.log_softmax(logits.float() / t, dim=1)
                                 for logits, t in zip(member_logits, self.temperatures)])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mean_log_probs([self.predicting_member(i)(x) for i in range(len(self.members))])

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble's logits and each member's penultimate features side by side, joined as
        `self.features` says (what the out-of-scope guard and the drift embedding read), from one
        forward pass of each member."""
        logits, features, _ = self.logits_features_and_member_probs(x)
        return logits, features

    def logits_features_and_member_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits_and_features, plus each member's calibrated probabilities (N, members, classes), from
        the same forward pass (the members' disagreement: benchmarks/ood_refusal.py)."""
        outputs = [penultimate(self.predicting_member(i), self.archs[i], x) for i in range(len(self.members))]
        parts = [o[1].float() for o in outputs]
        if self.features == FEATURES_UNIT_PER_MEMBER:
            parts = [torch.nn.functional.normalize(f, dim=1) for f in parts]
        member_logits = [o[0] for o in outputs]
        member_probs = torch.stack([torch.softmax(logits.float() / t, dim=1)
                                    for logits, t in zip(member_logits, self.temperatures)], dim=1)
        return self._mean_log_probs(member_logits), torch.cat(parts, dim=1), member_probs

def member_entries(card) -> list[dict]:
    """The members recorded in an ensemble card (`config["ensemble"]["members"]`), each field checked."""
    members = ((card.config or {}).get("ensemble") or {}).get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise ModelError(f"ensemble card {card.model_id}: config.ensemble.members must list at least 2 members")
    for i, entry in enumerate(members):
        missing = [name for name in MEMBER_FIELDS if not isinstance(entry, dict) or name not in entry]
        if missing:
            raise ModelError(f"ensemble card {card.model_id}: member {i} lacks {missing}")
    return members


def build_ensemble(card, num_classes: int) -> Ensemble:
    """The untrained Ensemble an ensemble card describes (load its state_dict next)."""
    entries = member_entries(card)
    members = [build_model(e["arch"], num_classes, "none", dropout=float(e["dropout"] or 0.0)) for e in entries]
    features = ((card.config or {}).get("ensemble") or {}).get("features", FEATURES_RAW)
    return Ensemble(members, [e["arch"] for e in entries], [float(e["temperature"]) for e in entries],
                    [bool(e["test_time_hflip"]) for e in entries], features)


def ensemble_state(member_states: list[dict]) -> dict:
    """One state_dict from the members' (their plain networks'), keys prefixed `members.<i>.`."""
    return {f"members.{i}.{key}": value for i, state in enumerate(member_states) for key, value in state.items()}

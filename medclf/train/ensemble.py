"""Making an ensemble artifact (`medclf ensemble`) from trained member artifacts: the members are checked
to answer the same question on the same input, their networks joined (medclf.model.ensemble), and the
ensemble gets what training gives a single model: a decision threshold and metrics on labelled films, an
out-of-scope domain and a drift reference (medclf.monitor), all measured on those same films.

It lives here, beside training's own finish, because it writes a model artifact and needs the layers
above medclf.model (the guard and the reference are medclf.monitor's, the metrics medclf.report's).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import torch

from medclf import storage
from medclf.config import Config
from medclf.errors import ModelError
from medclf.imaging.decode import decode
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.model.artifact import ArtifactFiles, ModelCard, read_artifact, save_artifact
from medclf.model import card as model_card
from medclf.model.card import software_versions
from medclf.model.decision import choose_threshold
from medclf.model.ensemble import ENSEMBLE_ARCH, FEATURES_UNIT_PER_MEMBER, Ensemble, ensemble_state
from medclf.model.networks import class_probabilities
from medclf.model.site_fit import resolve_rule
from medclf.monitor.ood import add_domain
from medclf.monitor.reference import add_reference
from medclf.report.metrics import classification_metrics

# What every member must share with the first: the question (classes, positive class) and the input
# (one preprocessing function feeds every member, so their specs must be equal).
SHARED_FIELDS = ("classes", "positive_class", "preprocess")


def read_members(member_paths: list[str]) -> list[ArtifactFiles]:
    """Each member artifact read once (weights and hashes checked), refused where it cannot join."""
    if len(member_paths) < 2:
        raise ModelError(f"an ensemble needs at least 2 members, got {len(member_paths)}")
    members = [read_artifact(path) for path in member_paths]
    check_members(members)
    return members


def check_members(members: list[ArtifactFiles]) -> None:
    """Refuse (ModelError naming the member and the field) a member that differs from the first in
    classes, positive class or preprocessing spec, or that is itself an ensemble."""
    first = members[0]
    for member in members:
        if member.card.arch == ENSEMBLE_ARCH:
            raise ModelError(f"member {member.path} is itself an ensemble: list its members instead")
    for member in members[1:]:
        for name in SHARED_FIELDS:
            mine, theirs = getattr(member.card, name), getattr(first.card, name)
            if name == "preprocess":
                mine, theirs = member.card.preprocess_spec, first.card.preprocess_spec
            if mine != theirs:
                why = (" (an ensemble feeds all members from one preprocessing function)"
                       if name == "preprocess" else "")
                raise ModelError(f"member {member.path}: {name} {getattr(member.card, name)!r} differs from "
                                 f"{getattr(first.card, name)!r} of member {first.path}{why}")


def threshold_rule(members: list[ArtifactFiles], rule: Optional[str] = None,
                   target_sensitivity: Optional[float] = None) -> tuple[str, float]:
    """The ensemble's threshold rule and target: `rule` where given (the target defaults to the members'),
    else the members' own rule, which must then be the same for every member: members trained to different
    operating points leave no rule to inherit, so that is refused (ModelError naming them), not decided
    by which member was listed first."""
    rules = [resolve_rule(m.card, "model", target_sensitivity) for m in members]
    if rule is not None:
        return rule, rules[0][1] if target_sensitivity is None else float(target_sensitivity)
    def described(r):
        return r[0] + (f" {r[1]:g}" if r[0] == "target_sensitivity" else "")
    if len({described(r) for r in rules}) > 1:
        listed = "; ".join(f"{m.path}: {described(r)}" for m, r in zip(members, rules))
        raise ModelError(f"the members' threshold rules differ ({listed}): name the ensemble's with "
                         "--threshold-rule (and --target-sensitivity)")
    return rules[0]


def member_entry(member: ArtifactFiles) -> dict:
    """What the ensemble card records of a member (medclf.model.ensemble.MEMBER_FIELDS, plus its path)."""
    card = member.card
    return {"arch": card.arch, "temperature": float(card.temperature),
            "dropout": float((card.config.get("model") or {}).get("dropout", 0.0) or 0.0),
            "model_id": card.model_id, "test_time_hflip": bool(card.test_time_hflip), "path": member.path}


def join_networks(members: list[ArtifactFiles]) -> Ensemble:
    """The members' networks (plain, without MirrorMean: the Ensemble mirrors each where its card says)."""
    networks = [member.network() for member in members]
    plain = [getattr(n, "inner", n) for n in networks]
    ensemble = Ensemble(plain, [m.card.arch for m in members], [m.card.temperature for m in members],
                        [m.card.test_time_hflip for m in members], FEATURES_UNIT_PER_MEMBER)
    # The saved state is the members' own, prefixed; checked here so a renamed key fails before saving.
    ensemble.load_state_dict(ensemble_state([m.state for m in members]))
    return ensemble.eval()


def labelled_probabilities(model: Ensemble, spec, paths: list[str], batch: int = 32) -> np.ndarray:
    """The ensemble's probabilities of each labelled film, through decode and preprocessing as scoring does."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = np.stack([preprocess_gray(decode(storage.read_bytes(p), p).image, spec) for p in paths[i:i + batch]])
            out.append(class_probabilities(model(to_model_input(torch.from_numpy(x))), 1.0).numpy())
    return np.concatenate(out)


def label_indices(labels: list[str], classes: list[str], source: str) -> np.ndarray:
    """Class indices of the labels; refuses unknown labels and a sample missing a class."""
    unknown = sorted({lab for lab in labels if lab not in classes})
    if unknown:
        raise ModelError(f"{source}: labels {unknown} are not the members' classes {classes}")
    missing = [c for c in classes if c not in labels]
    if missing:
        raise ModelError(f"{source}: no film of class {missing}; the threshold and metrics need every class")
    return np.array([classes.index(lab) for lab in labels])


def decision(first: ModelCard, y: np.ndarray, probs: np.ndarray, n: int, rule: str,
             target: float) -> tuple[Optional[float], str]:
    """The threshold chosen on the labelled films with `rule` (threshold_rule's); None (argmax) for a
    multi-class model."""
    positive = first.positive_index
    if positive is None or len(first.classes) != 2:
        return None, "argmax"
    threshold = choose_threshold((y == positive).astype(int), probs[:, positive], rule, target)
    return threshold, rule + (f" {target:g}" if rule == "target_sensitivity" else "") + \
        f" on {n} labelled films, ensemble probabilities"


def ensemble_card(members: list[ArtifactFiles], y: np.ndarray, probs: np.ndarray, source: str,
                  rule: tuple[str, float]) -> ModelCard:
    """The ensemble's card: the members' question and input, temperature 1.0 (the members' own are
    inside the network), the threshold (by `rule`: threshold_rule's) and metrics on the labelled films,
    no adaptation verdict."""
    first = members[0].card
    rule, target = rule
    threshold, rule_text = decision(first, y, probs, len(y), rule, target)
    metrics = classification_metrics(y, probs, first.positive_index, threshold)
    metrics["n"] = int(len(y))
    return ModelCard(
        arch=ENSEMBLE_ARCH, classes=list(first.classes), preprocess=dict(first.preprocess),
        positive_class=first.positive_class, threshold=threshold, threshold_rule=rule_text, temperature=1.0,
        calibration={"method": "mean of the members' probabilities, each at its own fitted temperature",
                     "fitted_on": "the members' validation sets"},
        metrics={"labelled_films": metrics, "labelled_source": source},
        config={"ensemble": {"members": [member_entry(m) for m in members], "labelled": source,
                             "features": FEATURES_UNIT_PER_MEMBER},
                "train": {"threshold": rule, "target_sensitivity": target}},
        intended_use=dict(first.intended_use),
        provenance={"software": software_versions(), "members": [m.card.model_id for m in members]},
        adaptation=None)  # score.adapt=auto never adapts an ensemble (verdict absent)


def make_ensemble(member_paths: list[str], dest: str, labelled_paths: list[str], labels: list[str], cfg: Config,
                  source: str = "labelled films", seed: int = 0, rule: Optional[str] = None,
                  target_sensitivity: Optional[float] = None) -> ModelCard:
    """Write the ensemble artifact of `member_paths` to `dest` (local or s3://): weights and card, then
    its out-of-scope domain (`cfg.ood`, `cfg.data.modalities`...; skipped when ood.enabled is false)
    and drift reference, all fitted on the labelled films, and MODEL_CARD.md. The threshold rule:
    threshold_rule(members, rule, target_sensitivity). Returns the final card."""
    members = read_members(member_paths)
    chosen = threshold_rule(members, rule, target_sensitivity)
    first = members[0].card
    y = label_indices(labels, first.classes, source)
    ensemble = join_networks(members)
    probs = labelled_probabilities(ensemble, first.preprocess_spec, labelled_paths)
    card = ensemble_card(members, y, probs, source, chosen)
    with tempfile.TemporaryDirectory() as tmp:
        plain, guarded = os.path.join(tmp, "plain"), os.path.join(tmp, "guarded")
        save_artifact(ensemble, card, plain)
        if cfg.ood.enabled:
            add_domain(plain, guarded, cfg, labelled_paths, labels)
        else:
            guarded = plain
        add_reference(guarded, dest, labelled_paths, labels, seed=seed)
    final = read_artifact(dest, weights=False).card
    model_card.write(final, dest)  # MODEL_CARD.md beside model.json, as training writes it
    return final

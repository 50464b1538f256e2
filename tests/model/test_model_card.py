"""The model card: model.json records use, data, software and config hash; MODEL_CARD.md renders them."""

import dataclasses
import os
import re

import pandas as pd
import torch

from medclf.config import Config
from medclf.model.card import CARD_MARKDOWN, REQUIRED_SECTIONS, config_sha256, render
from medclf.model.artifact import load_card


def test_trained_artifact_has_a_card_people_can_read(trained_model):
    card = load_card(trained_model.model_path)
    prov = card.provenance
    assert prov["software"]["torch"] == torch.__version__ and prov["software"]["medclf"]
    assert re.fullmatch(r"[0-9a-f]{64}", prov["config_sha256"])
    assert prov["config_sha256"] == config_sha256(Config.model_validate(card.config))  # reproducible from the card
    splits = pd.read_parquet(os.path.join(os.path.dirname(trained_model.model_path), "splits.parquet"))
    images = prov["training_data"]["images"]
    for split in ("train", "val"):
        for c in card.classes:
            assert images[split][c] == int(((splits["split"] == split) & (splits["label"] == c)).sum())
    assert prov["training_data"]["split_scheme"].startswith("patient")

    text = open(os.path.join(trained_model.model_path, CARD_MARKDOWN)).read()
    assert text == render(card)
    positions = [text.index(heading) for heading in REQUIRED_SECTIONS]  # every one, in order
    assert positions == sorted(positions)
    assert f"Training config sha256: `{prov['config_sha256']}`" in text and f"torch {torch.__version__}" in text
    assert f"Measured on {card.reference['n']} validation images" in text  # the drift reference
    v = card.metrics["validation_patient"]
    assert f"| roc_auc | {v['roc_auc']:.4f} | {v['roc_auc_ci_low']:.3f}-{v['roc_auc_ci_high']:.3f} |" in text
    assert f"Temperature {card.temperature:.3f}" in text and card.threshold_rule in text
    # failure modes: the most confident errors, files hashed (names can carry a patient's)
    if card.failure_modes:
        assert "## Known failure modes" in text
        probs = [e["probability"] for e in card.failure_modes]
        assert probs == sorted(probs, reverse=True)
        assert all(e["file"].startswith("file-") and e["true"] != e["predicted"] for e in card.failure_modes)
        assert not any(p in text for p in splits["path"])


def test_stated_use_is_rendered(trained_model):
    card = dataclasses.replace(load_card(trained_model.model_path), intended_use={
        "intended_use": "Second reader for paediatric chest films.", "out_of_scope_use": "Adults; CT.",
        "population": "Children aged 1-5, one hospital."})
    text = render(card)
    assert "Second reader for paediatric chest films." in text and "Adults; CT." in text
    assert "Children aged 1-5, one hospital." in text

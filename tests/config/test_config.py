import pytest

from medclf.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "model.arch=resnet34", "data.classes=[a, b]", "score.use_gpu=true"])
    assert cfg.train.epochs == 3 and cfg.model.arch == "resnet34"
    assert cfg.data.classes == ["a", "b"] and cfg.score.use_gpu is True


def test_repo_configs_are_valid():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    files = glob.glob(os.path.join(root, "*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "train:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "train.epocs" in msg and "unknown key" in msg and "'epochs'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_config(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_bad_value_names_key_and_value(tmp_path):
    p = write(tmp_path, "train:\n  epochs: ten\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "train.epochs" in msg and "'ten'" in msg and "train.lr" in msg


def test_unknown_model_is_refused_with_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"model.arch: unknown model 'resnet19' \(did you mean 'resnet18'\?\)"):
        load_config(write(tmp_path, "model:\n  arch: resnet19\n"))


@pytest.mark.parametrize("mode,ok", [("finetune", True), ("feature_extractor", True), ("freeze_first:2", True),
                                     ("freeze_first", False), ("frozen", False)])
def test_transfer_modes(mode, ok):
    if ok:
        assert load_config(None, [f"model.transfer={mode}"]).model.transfer == mode
    else:
        with pytest.raises(ConfigError, match="model.transfer"):
            load_config(None, [f"model.transfer={mode}"])


def test_positive_class_must_be_a_class():
    with pytest.raises(ConfigError, match="positive_class 'x' is not in data.classes"):
        load_config(None, ["data.classes=[a, b]", "data.positive_class=x"])


def test_bad_regex_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="data.patient_regex"):
        load_config(None, ["data.patient_regex='(unclosed'"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [epochs: 3\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.epochs"])


def test_config_base_file_is_overlaid(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {arch: resnet18, dropout: 0.2}\ntrain: {epochs: 9, lr: 0.002}\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nmodel: {arch: efficientnet_lite0}\ntrain: {epochs: 4}\n")
    cfg = load_config(tmp_path / "variant.yaml")
    assert (cfg.model.arch, cfg.model.dropout, cfg.train.epochs, cfg.train.lr) == ("efficientnet_lite0", 0.2, 4, 0.002)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")

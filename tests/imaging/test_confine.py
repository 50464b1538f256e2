"""Inputs and outputs confined (issue 34, item 5): manifest entries under score.allowed_roots with
symlinks resolved, /proc /sys /dev never read, file:// normalised or refused, --input/--output
schemes checked before Ray starts, and a refused run leaves no run folder (no Ray)."""

import os

import pytest

from medclf import storage
from medclf.imaging import confine


def _refused(path, roots):
    with pytest.raises(storage.InputRefused) as info:
        confine.check(path, roots)
    assert str(info.value).startswith(str(path))  # names the file
    return str(info.value)


def test_entries_are_confined_to_the_roots_with_symlinks_resolved(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    outside = tmp_path / "secret.txt"
    outside.write_text("s")
    (root / "link.png").symlink_to(outside)  # inside by name, outside in fact
    (root / "proc.png").symlink_to("/proc/self/environ")
    roots = confine.resolved_roots([str(root)])
    confine.check(str(root / "a.png"), roots)
    confine.check(f"file://{root / 'a.png'}", roots)
    assert "outside score.allowed_roots" in _refused(str(root / "link.png"), roots)
    assert "outside score.allowed_roots" in _refused(str(root / ".." / "secret.txt"), roots)
    assert "outside score.allowed_roots" in _refused(str(tmp_path / "archive-other" / "a.png"), roots)  # prefix trap
    assert "resolves to /proc" in _refused(str(root / "proc.png"), roots)
    for banned in ("/proc/self/environ", "/sys/kernel/notes", "/dev/zero"):
        assert "never read" in _refused(banned, confine.resolved_roots(["/"]))  # whatever the roots say
    assert "file:// URL with a host" in _refused("file://host/etc/hosts", roots)
    relative = os.path.relpath("/etc/hosts")
    assert "outside" in _refused(relative, roots)


def test_default_root_is_the_inputs_own_folder(tmp_path):
    manifest = tmp_path / "night.csv"
    manifest.write_text("path\n")
    assert confine.default_roots(str(manifest)) == [str(tmp_path)]
    assert confine.default_roots(str(tmp_path / "scans" / "*.dcm")) == [str(tmp_path / "scans")]
    assert confine.default_roots(str(tmp_path)) == [str(tmp_path)]


def _model(tmp_path):
    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import build_model

    path = str(tmp_path / "model")
    save_artifact(build_model("small_cnn", 2), ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"],
                                                         preprocess={"image_size": 32}), path)
    return path


@pytest.mark.parametrize("output", ["http://example.org/out", "memory://out", "zip://x::/tmp/a.zip"])
def test_bad_output_scheme_exits_2_before_ray_and_leaves_nothing(tmp_path, monkeypatch, capsys, output):
    import medclf.cli as cli

    def no_ray(cfg, **options):
        raise AssertionError("Ray started for a refused run")

    monkeypatch.setattr(cli.scoring, "init_ray", no_ray)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rc = cli.run_command("score", ["--input", str(inputs), "--model", _model(tmp_path), "--output", output,
                                   "--run-root", str(tmp_path / "runs"), "--set", "score.uids=drop"])
    assert rc == 2 and "outputs are local paths or s3:// URLs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_lease_refusal_exits_3_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys, phantom_root):
    import medclf.cli as cli
    from medclf.score.lease import LEASE_HELD_EXIT, Lease

    monkeypatch.setattr(cli.scoring, "init_ray", lambda cfg, **options: None)  # refused at the lease, before any Ray work
    monkeypatch.setattr(cli.scoring, "use_shared_root", lambda cfg: None)
    monkeypatch.setattr(cli.scoring, "check_shared_storage", lambda *a: None)
    out = str(tmp_path / "pred")
    other = Lease(out, "other", 600).acquire()
    try:
        rc = cli.run_command("score", ["--input", os.path.join(phantom_root, "test"), "--model", _model(tmp_path),
                                       "--output", out, "--run-root", str(tmp_path / "runs"), "--run-id", "refused",
                                       "--set", "score.uids=drop", "--set", "tracking.enabled=false"])
    finally:
        other.release()
    assert rc == LEASE_HELD_EXIT and "is being written by run other" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "refused").exists()

"""The streaming data path: the preprocessed cache (built once, reused, rebuilt on change), each
worker's shard (disjoint, together the training set, reproducible order), training from s3://."""

import json
import os
import shutil

import pytest

from medclf import storage
from medclf.data.cache import duplicate_audit, ensure_cache
from medclf.config import load_config
from medclf.train.driver import make_trainer, run_training
from medclf.train.inputs import start_run
from medclf.train.worker_data import ShardData
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def parquet_files(cache):
    return {f: os.stat(os.path.join(cache.path, f)).st_mtime_ns for f in os.listdir(cache.path)
            if f.endswith(".parquet")}


def test_cache_is_reused_when_nothing_changed_and_rebuilt_when_a_file_did(ray_cluster, phantom_root, tmp_path,
                                                                          capsys):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(phantom_root, "train"), data / "train")
    cfg = load_config(None, TINY + [f"data.root={data}", f"run.root={tmp_path}"])
    inputs = start_run(cfg, str(tmp_path / "run"), None, False)
    build = lambda: ensure_cache("train", inputs.train, inputs.train_y, inputs.classes, cfg, str(tmp_path / "cache"))  # noqa: E731

    first = build()
    assert first.built and first.rows == len(inputs.train)
    files = parquet_files(first)
    assert files and "data cache: building" in capsys.readouterr().out

    again = build()  # no decode tasks: nothing is written, the same part files are read
    assert not again.built and again.path == first.path and parquet_files(again) == files
    assert "data cache: reusing" in capsys.readouterr().out

    changed, donor = inputs.train.path[0], inputs.train.path[1]
    shutil.copyfile(donor, changed)  # same path and listing, other content (size/mtime differ)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    rebuilt = build()
    assert rebuilt.built and rebuilt.key != first.key
    out = capsys.readouterr().out
    assert "data cache: building" in out and f"changed since train-{first.key}" in out


def record_shards(loop_config):
    """A Train loop that only streams, as train_loop_per_worker does: each rank writes, per epoch,
    the split rows of its batches in the order it got them (from `start_epoch`, as a resumed run)."""
    import ray.train

    from medclf.train.parts import LoopConfig

    job = LoopConfig.model_validate(loop_config["job"])
    ctx = ray.train.get_context()
    start = loop_config["start_epoch"]
    data = ShardData(job, ctx.get_world_rank(), ctx.get_world_size(), loop_config["run_dir"], start)
    seen = {epoch: [r for _, rows in data.train_batches(epoch, second="row") for r in rows.tolist()]
            for epoch in range(start, 2)}
    with open(os.path.join(loop_config["out"], f"rank{ctx.get_world_rank()}.json"), "w") as f:
        json.dump(seen, f)


def source_operator(ds) -> str:
    op = ds._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    return op.name


def stream_once(cfg, inputs, caches, out, start_epoch=0):
    import sys

    import ray.cloudpickle
    import ray.data

    from medclf.train.driver import feed

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    os.makedirs(out)
    loop_config, data_kwargs, _ = feed(cfg, inputs, caches, out)
    for ds in data_kwargs["datasets"].values():  # read-ahead capped (train.stream_buffer_mb), not half the store
        assert ds.context.execution_options.resource_limits.object_store_memory == cfg.train.stream_buffer_mb * 2**20
        assert source_operator(ds) == "ReadParquet"  # the first reader: no FooterReader pool (cache.READER_NOTE)
    assert ray.data.DataContext.get_current().use_datasource_v2  # ... chosen for the cache only
    make_trainer(cfg, out, {**loop_config, "out": out, "start_epoch": start_epoch}, loop=record_shards,
                 **data_kwargs).fit()
    return [{int(k): v for k, v in json.load(open(os.path.join(out, f"rank{r}.json"))).items()} for r in (0, 1)]


def test_each_worker_streams_a_disjoint_shard_in_a_seeded_order(ray_cluster, phantom_root, tmp_path):
    # batch 2, 2 workers: with an even training set nothing is left out to keep the shards equal
    cfg = load_config(None, TINY + [f"data.root={phantom_root}", f"run.root={tmp_path}", "train.batch_size=2",
                                    "train.shuffle_buffer=8"])
    inputs = start_run(cfg, str(tmp_path / "run"), None, False)
    n = len(inputs.train)
    caches = {name: ensure_cache(name, part, y, inputs.classes, cfg, str(tmp_path / "cache")) for name, part, y in
              (("train", inputs.train, inputs.train_y), ("val", inputs.val, inputs.val_y))}
    first = stream_once(cfg, inputs, caches, str(tmp_path / "a"))
    for epoch in (0, 1):
        a, b = first[0][epoch], first[1][epoch]
        assert len(a) == len(b) and not set(a) & set(b)  # equal, disjoint shards
        assert len(a) + len(b) == len(set(a) | set(b)) >= n - 1  # each row once; an odd set leaves one out
        assert set(a) | set(b) <= set(range(n))
    assert first[0][0] != first[0][1]  # another order every epoch
    assert stream_once(cfg, inputs, caches, str(tmp_path / "b")) == first  # the same seed: the same order
    # A run resumed at epoch 1 (new workers, new shards) gets epoch 1's order, not epoch 0's again.
    resumed = stream_once(cfg, inputs, caches, str(tmp_path / "c"), start_epoch=1)
    assert [r[1] for r in resumed] == [r[1] for r in first]


def test_training_from_an_s3_prefix(ray_cluster, phantom_root, s3_bucket, tmp_path):
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for d, _, files in os.walk(os.path.join(phantom_root, "train")):
        for f in files:
            s3.pipe(f"{s3_bucket}/archive/{os.path.relpath(os.path.join(d, f), phantom_root)}",
                    open(os.path.join(d, f), "rb").read())
    cfg = load_config(None, TINY + ["train.data_path=stream", f"data.root={s3_bucket}/archive", f"run.root={tmp_path}",
                                    f"train.cache_root={s3_bucket}/cache"])
    result = run_training(cfg, str(tmp_path / "run"))
    assert list(result.history.epoch) == [1] and os.path.exists(os.path.join(result.model_path, "model.json"))
    train_cache = result.caches["train"]
    assert train_cache.built and train_cache.path.startswith(f"{s3_bucket}/cache/train-")
    assert any(p.endswith(".parquet") for p in storage.list_files(train_cache.path))
    pngs = [p for p in s3.find(f"{s3_bucket}/archive") if p.endswith(".png")]  # TINY trains on data.extensions=[.png]
    assert train_cache.rows + result.caches["val"].rows == len(pngs)


def test_duplicate_audit_names_label_conflicts_and_validation_copies(ray_cluster, phantom_root, tmp_path, capsys):
    # A real archive holds byte-identical files (BUSI: one image filed as benign and as malignant):
    # the cache build's checksums find them without reading any file again.
    data = tmp_path / "data"
    shutil.copytree(os.path.join(phantom_root, "train"), data / "train")
    cfg = load_config(None, TINY + [f"data.root={data}", f"run.root={tmp_path}"])
    inputs = start_run(cfg, str(tmp_path / "run"), None, False)
    val_path, val_label = inputs.val.path.iat[0], inputs.val.label.iat[0]
    other = inputs.train[inputs.train.label != val_label].path.iat[0]
    shutil.copyfile(val_path, other)  # a training file of another class becomes a copy of a validation file
    caches = {name: ensure_cache(name, part, y, inputs.classes, cfg, str(tmp_path / "cache")) for name, part, y in
              (("train", inputs.train, inputs.train_y), ("val", inputs.val, inputs.val_y))}
    audit = duplicate_audit(caches, {"train": inputs.train, "val": inputs.val})
    assert audit["val_copies_of_train"] == [val_path]
    conflict = {(c["path"], c["split"]) for c in audit["label_conflicts"][0]}
    assert conflict == {(val_path, "val"), (other, "train")} and len(audit["label_conflicts"]) == 1
    out = capsys.readouterr().out
    assert "identical files with different labels" in out and os.path.basename(other) in out

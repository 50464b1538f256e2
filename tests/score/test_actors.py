"""Issue 35, item 5: `score.num_actors: auto` is one inference actor per GPU of the cluster (config level)."""

import pytest

from medclf.config import ConfigError, load_config
from medclf.errors import UserError
from medclf.score.actors import gpus_per_actor, resolve_num_actors


def test_config_takes_auto_or_a_positive_count():
    assert load_config(None, ["score.num_actors=auto"]).score.num_actors == "auto"
    assert load_config(None, ["score.num_actors=3"]).score.num_actors == 3
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="num_actors"):
            load_config(None, [f"score.num_actors={bad}"])


@pytest.mark.parametrize("resources, gpus", [
    ({"CPU": 16.0, "GPU": 1.0}, 1),  # one H200 machine
    ({"CPU": 64.0, "GPU": 8.0}, 8),  # 8 GPUs on one node
    ({"CPU": 96.0, "GPU": 12.0}, 12),  # 3 nodes x 4 GPUs: Ray sums the cluster, places one actor per GPU
])
def test_auto_is_one_actor_per_gpu_across_nodes(resources, gpus):
    assert resolve_num_actors("auto", True, 1.0, resources) == gpus


def test_auto_on_cpus_leaves_half_for_decoding_and_explicit_counts_win():
    assert resolve_num_actors("auto", False, 1.0, {"CPU": 2.0}) == 1
    assert resolve_num_actors("auto", False, 2.0, {"CPU": 16.0}) == 4
    assert resolve_num_actors(3, True, 1.0, {"CPU": 2.0}) == 3


def test_auto_with_gpu_but_none_in_the_cluster_is_a_clear_error():
    with pytest.raises(UserError, match="no GPU"):
        resolve_num_actors("auto", True, 1.0, {"CPU": 8.0})


def test_several_actors_share_each_gpu():
    assert load_config(None, ["score.actors_per_gpu=3"]).score.actors_per_gpu == 3
    with pytest.raises(ConfigError, match="actors_per_gpu"):
        load_config(None, ["score.actors_per_gpu=0"])
    assert resolve_num_actors("auto", True, 1.0, {"CPU": 32.0, "GPU": 2.0}, per_gpu=3) == 6
    assert gpus_per_actor(True, 4) == 0.25 and gpus_per_actor(True) == 1.0 and gpus_per_actor(False, 4) == 0

"""The Ray layout as a pure function of the flags: no Ray, no cluster."""

from __future__ import annotations

import pytest

from miles.config import PlacementConfig
from miles.orchestrate.ray_layout import RayPlacementError, ray_layout


def test_disaggregated_puts_engines_in_their_own_group():
    layout = ray_layout(PlacementConfig(actor_num_gpus_per_node=2, rollout_num_gpus=3))
    assert layout.group_sizes == (2, 3) and layout.share == 1.0
    assert [layout.trainer_bundle(r) for r in range(2)] == [(0, 0), (0, 1)]
    assert [layout.engine_bundle(i) for i in range(3)] == [(1, 0), (1, 1), (1, 2)]
    assert layout.transport == "distributed" and layout.logical_cpus == 6


def test_colocated_engines_share_the_ranks_bundles_half_each():
    layout = ray_layout(PlacementConfig(colocate=True, actor_num_gpus_per_node=2, rollout_num_gpus=4))
    assert layout.group_sizes == (2,) and layout.share == 0.5
    assert [layout.engine_bundle(i) for i in range(4)] == [(0, 0), (0, 1), (0, 0), (0, 1)]
    assert layout.transport == "tensor" and layout.logical_cpus == 3


def test_external_engines_start_no_engine_actor():
    layout = ray_layout(
        PlacementConfig(
            rollout_external_engine_addrs=("h1:30000", "http://h2:30000"), update_weight_transport="disk"
        )
    )
    assert layout.engines == 0 and layout.group_sizes == (1,)
    assert layout.external_urls == ("http://h1:30000", "http://h2:30000") and layout.transport == "disk"
    with pytest.raises(IndexError):
        layout.engine_bundle(0)


def test_several_nodes_multiply_the_trainer_ranks():
    layout = ray_layout(PlacementConfig(actor_num_nodes=2, actor_num_gpus_per_node=4, rollout_num_gpus=2))
    assert layout.trainer_ranks == 8 and layout.group_sizes == (8, 2)
    assert layout.trainer_bundle(7) == (0, 7)
    with pytest.raises(IndexError):
        layout.trainer_bundle(8)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "needs engines"),
        ({"rollout_num_gpus": 1, "update_weight_transport": "tensor"}, "needs --colocate"),
    ],
)
def test_impossible_layouts_name_the_flags(flags, message):
    with pytest.raises(RayPlacementError, match=message):
        ray_layout(PlacementConfig(**flags))

"""The graph buckets and the flags that choose graphs, async scheduling and the attention backend."""
from __future__ import annotations

import pytest

from engine_svc.attention import get_backend
from engine_svc.config import config_from_args
from engine_svc.worker.graph_layout import RowShape, graph_batch_sizes, graph_shapes, select_shape


@pytest.mark.parametrize("max_num_seqs,sizes", [(1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]),
                                                (20, [1, 2, 4, 8, 16, 20]),
                                                (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64])])
def test_graph_batch_sizes(max_num_seqs, sizes):
    assert graph_batch_sizes(max_num_seqs) == sizes


def test_a_decode_batch_runs_in_the_smallest_bucket_that_holds_it():
    shapes = graph_shapes([1, 2, 4, 8, 16, 20], [], 2048)
    decode = RowShape(start=10, num_new_tokens=1, num_proposals=0, samples=True)
    assert [select_shape([decode] * n, shapes, 64).batch for n in (1, 2, 3, 5, 8, 9, 17, 20)] == \
        [1, 2, 4, 8, 8, 16, 20, 20]
    assert select_shape([decode] * 21, shapes, 64) is None     # larger than every bucket: eager


def test_flags():
    cfg = config_from_args(["--model", "m"])
    assert (cfg.attention_backend, cfg.enforce_eager, cfg.async_scheduling) == ("auto", False, None)
    cfg = config_from_args(["--model", "m", "--enforce-eager", "--no-async-scheduling"])
    assert cfg.enforce_eager and cfg.async_scheduling is False
    assert config_from_args(["--model", "m", "--async-scheduling"]).async_scheduling is True
    assert get_backend("auto", "cpu").name == "torch"

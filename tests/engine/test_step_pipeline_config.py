"""The decode-graph buckets and the flags that choose graphs, async scheduling and the attention backend."""
from __future__ import annotations

import pytest

from engine_svc.attention import get_backend
from engine_svc.config import config_from_args
from engine_svc.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes


@pytest.mark.parametrize("max_num_seqs,sizes", [(1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]),
                                                (20, [1, 2, 4, 8, 16, 20]),
                                                (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64])])
def test_graph_batch_sizes(max_num_seqs, sizes):
    assert graph_batch_sizes(max_num_seqs) == sizes


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it():
    ran = []
    graphs = DecodeGraphs(lambda b: ran.append(b) or b, [1, 2, 4, 8, 16, 20], capture=False)
    assert [graphs.bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 20)] == [1, 2, 4, 8, 8, 16, 20, 20]
    assert graphs.bucket(21) is None                    # larger than every bucket: eager
    assert graphs.run(4) == 4 and ran == [4]            # not captured: the padded batch runs eagerly


def test_flags():
    cfg = config_from_args(["--model", "m"])
    assert (cfg.attention_backend, cfg.enforce_eager, cfg.async_scheduling) == ("auto", False, None)
    cfg = config_from_args(["--model", "m", "--enforce-eager", "--no-async-scheduling"])
    assert cfg.enforce_eager and cfg.async_scheduling is False
    assert config_from_args(["--model", "m", "--async-scheduling"]).async_scheduling is True
    assert get_backend("auto", "cpu").name == "torch"

"""Which CUDA graph a decode or verify step runs in, its inputs padded to the graph's shape (plain lists: no
device), and the padded plan as the step broadcast carries it to the other ranks. The padded layout's forward
equals the eager one's in tests/kernels/test_verify_graphs.py."""
from __future__ import annotations

import pytest

from engine_svc.worker.graph_layout import GraphShape, RowShape, graph_shapes, pad_step, select_shape
from engine_svc.worker.input_buffers import HostStep, table_rows

DECODE = RowShape(start=10, num_new_tokens=1, num_proposals=0, samples=True)


def verify(k: int, start: int = 10) -> RowShape:
    return RowShape(start=start, num_new_tokens=1 + k, num_proposals=k, samples=True)


SHAPES = graph_shapes([1, 2, 4, 8], [4], max_tokens=24)   # K = 3: verify rows of 4 tokens


def test_verify_shapes_fit_the_step_budget():
    assert SHAPES == [GraphShape(b, 1) for b in (1, 2, 4, 8)] + [GraphShape(b, 4) for b in (1, 2, 4)]
    assert graph_shapes([1, 2], [1], 64) == [GraphShape(1, 1), GraphShape(2, 1)]   # K = 0: decode graphs only


def test_a_step_runs_in_the_smallest_shape_that_holds_it():
    assert select_shape([DECODE] * 3, SHAPES, 64) == GraphShape(4, 1)
    assert select_shape([verify(3)], SHAPES, 64) == GraphShape(1, 4)
    # Rows with and without proposals in one step: every row padded to K + 1 tokens.
    assert select_shape([verify(1), DECODE, verify(2)], SHAPES, 64) == GraphShape(4, 4)
    two_widths = graph_shapes([1, 2, 4], [3, 5], 64)
    assert select_shape([verify(2), DECODE], two_widths, 64) == GraphShape(2, 3)
    assert select_shape([verify(4)], two_widths, 64) == GraphShape(1, 5)


def test_steps_a_graph_cannot_run_go_eager():
    assert select_shape([verify(4)], SHAPES, 64) is None                       # more proposals than K
    assert select_shape([verify(1)] * 5, SHAPES, 64) is None                   # 5 x 4 tokens: over the budget
    assert select_shape([DECODE] * 9, SHAPES, 64) is None                      # more rows than any bucket
    prefill = RowShape(start=0, num_new_tokens=6, num_proposals=0, samples=True)
    assert select_shape([prefill, DECODE], SHAPES, 64) is None
    chunk = RowShape(start=0, num_new_tokens=1, num_proposals=0, samples=False)   # a chunk before the prompt's end
    assert select_shape([chunk], SHAPES, 64) is None
    assert select_shape([], SHAPES, 64) is None
    # Padded positions must stay below max_model_len: a verify row starting at 61 has 3, not 4, positions left.
    assert select_shape([verify(1, start=61)], SHAPES, 64) is None
    assert select_shape([verify(1, start=60)], SHAPES, 64) == GraphShape(1, 4)
    assert select_shape([RowShape(63, 1, 0, True)], SHAPES, 64) == GraphShape(1, 1)   # decode at the last position


def two_rows() -> HostStep:
    """A verify row (start 9: its last token 50 and proposals 51, 52; blocks 3, 7) and a decode row (start 5,
    token 60, block 2) whose id is a placeholder from the step in flight (row 1 of its sampled ids); block size 4."""
    return HostStep(input_ids=[50, 51, 52, 60], positions=[9, 10, 11, 5], slot_mapping=[13, 14, 15, 9],
                    seq_lens=[12, 6], query_start=[0, 3, 4], logits_rows=[0, 1, 2, 3],
                    block_tables=table_rows([[0, 1, 3], [2]], 3), table_width=3,
                    placeholder_dst=[3], placeholder_src=[1])


def test_padding_to_a_verify_shape():
    padded = pad_step(two_rows(), GraphShape(3, 4), table_width=5)
    assert padded.input_ids == [50, 51, 52, 0, 60, 0, 0, 0, 0, 0, 0, 0]
    assert padded.positions == [9, 10, 11, 12, 5, 6, 7, 8, 0, 1, 2, 3]
    assert padded.slot_mapping == [13, 14, 15, -1, 9, -1, -1, -1, -1, -1, -1, -1]
    assert padded.seq_lens == [13, 9, 4]
    assert padded.query_start == [0, 4, 8, 12]
    assert padded.logits_rows == [0, 1, 2, 4] + [0] * 8     # the real rows first, in the eager order
    assert padded.block_tables == [0, 1, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert padded.table_width == 5
    assert (padded.placeholder_dst, padded.placeholder_src) == ([4], [1])


def test_padding_writes_only_the_real_slots_and_keeps_every_real_tokens_view():
    """The KV the padded step writes is the real step's (padded tokens write nothing: no rejected or padded
    position reaches the cache or the tables), and each real token keeps its position and its causal offset (a
    token at row offset t sees keys 0 .. seq_len - q_len + t, which must be its own position)."""
    real = two_rows()
    for shape in (GraphShape(2, 4), GraphShape(4, 4), GraphShape(2, 6)):
        padded = pad_step(real, shape, table_width=5)
        assert sorted(s for s in padded.slot_mapping if s >= 0) == sorted(real.slot_mapping)
        for i in range(len(real.seq_lens)):
            a, b = real.query_start[i], real.query_start[i + 1]
            pa = padded.query_start[i]
            ctx = padded.seq_lens[i] - shape.width
            assert ctx == real.seq_lens[i] - (b - a)
            for t in range(b - a):
                assert padded.input_ids[pa + t] == real.input_ids[a + t]
                assert padded.positions[pa + t] == real.positions[a + t] == ctx + t
            # The row's table is its own, padded with block 0 (which padded tokens read; they never write).
            assert padded.block_tables[i * 5:i * 5 + 3] == real.block_tables[i * 3:i * 3 + 3]
        assert max(padded.positions) == 9 + shape.width - 1   # the verify row's start + width - 1: the last
        assert [padded.input_ids[r] for r in padded.logits_rows[:4]] == [real.input_ids[r] for r in real.logits_rows]


def test_padding_a_decode_batch_adds_inert_rows():
    real = HostStep([7, 8], [3, 20], [3, 20], [4, 21], [0, 1, 2], [0, 1], table_rows([[0], [1, 4, 5]], 3), 3, [], [])
    padded = pad_step(real, GraphShape(4, 1), table_width=4)
    assert padded.input_ids == [7, 8, 0, 0] and padded.positions == [3, 20, 0, 0]
    assert padded.slot_mapping == [3, 20, -1, -1] and padded.seq_lens == [4, 21, 1, 1]
    assert padded.query_start == [0, 1, 2, 3, 4] and padded.logits_rows == [0, 1, 0, 0]
    assert padded.block_tables == [0, 0, 0, 0, 1, 4, 5, 0] + [0] * 8


def test_a_plans_graph_shape_and_logits_rows_travel_in_the_step_broadcast(tmp_path):
    """What the other tensor-parallel ranks receive of a padded plan (one process, a gloo group of one: the
    broadcast leaves the packed tensor as sent, and recv() unpacks it)."""
    import torch.distributed as dist

    from engine_svc.worker.step_broadcast import StepChannel
    from engine_svc.worker.step_plan import StepPlan

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        channel = StepChannel([dist.group.WORLD], rank=0)
        host = pad_step(two_rows(), GraphShape(3, 4), table_width=5)
        for plan in (StepPlan(host, GraphShape(3, 4), num_real=2, num_logits=4, prompt_rows=(1,)),
                     StepPlan(two_rows(), None, num_real=2, num_logits=4, lora_active=True)):
            channel.send(plan)
            assert channel.recv() == plan
    finally:
        dist.destroy_process_group()

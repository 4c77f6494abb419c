"""Which CUDA graph a step runs in, and the step's host inputs padded to that graph's shape. Plain lists, no
device: the choice and the padding are tested on the CPU.

A graph of shape (batch b, width w) runs b rows of w tokens each: width 1 is a decode step (one token per row),
width K + 1 a verify step of speculative decoding (a row's last token and up to K proposals). A step runs in the
captured shape with the fewest tokens that holds it, when every row samples and is a decode or a verify row (no
prefill chunk). Its rows are padded to w tokens, and the batch to b rows:
- a padded token writes no KV (slot -1): no padded position reaches the cache, and the block tables are the
  requests' own (padded with block 0), so none reaches the block tables or the prefix cache either;
- a padded token continues its row's positions and the row's seq_len counts it, so the prefill kernel's causal
  offset (seq_len - q_len) stays the row's start: a real token at offset t sees exactly the keys 0 .. start + t,
  as in the eager step. Padded tokens see unwritten slots; their logits are never read;
- every padded position stays below max_model_len (a step with a row whose start + w would not runs eagerly), so
  no kernel reads a block table past its width, nor RoPE past its table;
- a padding row (past the batch) writes nothing and attends over block 0;
- logits_rows lists the real logits rows first, in the eager step's order, then row 0 up to b * w entries: the
  graph computes the logits of all b * w and the runner keeps the first (StepPlan.num_logits).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

from engine_svc.worker.input_buffers import HostStep

PAD_TOKEN = 0   # the input id of a padded token (any id in the vocabulary: its output is never read)


@dataclass(frozen=True)
class GraphShape:
    batch: int   # rows (sequences)
    width: int   # tokens per row: 1 decodes, K + 1 verifies K proposals

    @property
    def num_tokens(self) -> int:
        return self.batch * self.width


@dataclass(frozen=True)
class RowShape:
    """What the choice of a graph reads of a scheduled row."""
    start: int            # the row's first position
    num_new_tokens: int
    num_proposals: int    # its verified proposals (num_new_tokens - 1 for a verify row)
    samples: bool


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, the multiples of 8 below max_num_seqs, and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def graph_shapes(batch_sizes: list[int], verify_widths: list[int], max_tokens: int) -> list[GraphShape]:
    """The decode shape of every batch size, and a verify shape per batch size and verify width whose tokens fit
    the step budget (max_tokens: the persistent input buffers hold no more)."""
    shapes = [GraphShape(b, 1) for b in batch_sizes]
    return shapes + [GraphShape(b, w) for w in verify_widths if w > 1 for b in batch_sizes if b * w <= max_tokens]


def select_shape(rows: list[RowShape], shapes: list[GraphShape], max_model_len: int) -> GraphShape | None:
    """The captured shape a step of rows runs in, or None: eager (a prefill chunk, a row that does not sample, no
    shape wide or large enough, or a row too near max_model_len for the width)."""
    if not rows or not all(r.samples and r.num_new_tokens == 1 + r.num_proposals for r in rows):
        return None
    need = max(r.num_new_tokens for r in rows)
    last_start = max(r.start for r in rows)
    fits = [s for s in shapes if s.batch >= len(rows) and need <= s.width <= max_model_len - last_start]
    return min(fits, key=lambda s: (s.num_tokens, s.width), default=None)


def pad_step(host: HostStep, shape: GraphShape, table_width: int) -> HostStep:
    """host (a step's real rows, tables row-major at host.table_width) laid out in shape, with block tables
    table_width wide (the graph's); see the module docstring. host.extra is left out: it is per token, and the
    runner plans it for the padded rows."""
    w, qs = shape.width, host.query_start
    n = len(host.seq_lens)
    ids, positions, slots, seq_lens, tables = [], [], [], [], []
    for i in range(n):
        a, b = qs[i], qs[i + 1]
        pad = w - (b - a)
        last = host.positions[b - 1]
        ids += host.input_ids[a:b] + [PAD_TOKEN] * pad
        positions += host.positions[a:b] + list(range(last + 1, last + 1 + pad))
        slots += host.slot_mapping[a:b] + [-1] * pad
        seq_lens.append(host.seq_lens[i] + pad)
        row = host.block_tables[i * host.table_width:(i + 1) * host.table_width]
        tables += row + [0] * (table_width - len(row))
    extra = shape.batch - n   # padding rows: positions from 0, so ctx = seq_len - q_len = 0
    ids += [PAD_TOKEN] * (extra * w)
    positions += list(range(w)) * extra
    slots += [-1] * (extra * w)
    seq_lens += [w] * extra
    tables += [0] * (extra * table_width)

    def moved(r: int) -> int:   # a token's index in the padded layout
        i = bisect.bisect_right(qs, r) - 1
        return i * w + r - qs[i]

    logits_rows = [moved(r) for r in host.logits_rows]
    return replace(host, input_ids=ids, positions=positions, slot_mapping=slots, seq_lens=seq_lens,
                   query_start=list(range(0, shape.num_tokens + 1, w)),
                   logits_rows=logits_rows + [0] * (shape.num_tokens - len(logits_rows)),
                   block_tables=tables, table_width=table_width,
                   placeholder_dst=[moved(r) for r in host.placeholder_dst], extra={})


def row_lengths(host: HostStep) -> list[int]:
    """Tokens of each row of a step's layout."""
    qs = host.query_start
    return [b - a for a, b in zip(qs, qs[1:])]

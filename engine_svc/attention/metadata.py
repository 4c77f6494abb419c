"""What an attention backend needs to know about one flattened batch of sequences."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # Tokens of all sequences are flattened: sequence i owns rows query_start[i]:query_start[i+1].
    slot_mapping: torch.Tensor      # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor      # [num_seqs, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor          # [num_seqs] int32: context length after this step (cached + new)
    query_start: torch.Tensor       # [num_seqs + 1] int32
    # Host copies, so the reference backend can slice without device syncs.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # Host bound on seq_lens for kernels that size their grid from it; a CUDA graph, captured once for every
    # length, passes max_model_len. None: max(seq_lens_cpu).
    max_seq_len: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

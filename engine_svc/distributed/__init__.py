"""Tensor parallelism: the rank's process group (parallel_state), how heads, the MLP and the vocabulary split
across ranks (partition), and the parallel layers the model families are built from (layers)."""

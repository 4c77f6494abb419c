"""Pruning: sets a share of each decoder linear's weights to zero (`tandem prune`), and serves 2:4 checkpoints with
semi-structured sparse kernels where a GPU has them.

- spec: the sparsity asked for (N:M or an unstructured fraction) and the frozen prune configuration.
- masks: which weights a score matrix keeps, and the check that a weight has exactly a pattern.
- scores: magnitude (|W|) and Wanda (|W| times the L2 norm of each input feature's activations) scores.
- calibration: Wanda's activation norms, from calibration text run through the engine.
- sparsity_config: the `sparsity_config` entry of config.json that says how a checkpoint was pruned.
- checkpoint_writer / hf_export: the pruned HF safetensors directory.
- semi_sparse_linear / kernel_choice: serving 2:4 linears with torch's semi-structured sparse tensors.
"""

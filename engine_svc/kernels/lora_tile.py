"""The token tile of batched multi-LoRA: the host plan (engine_svc.lora.batch) cuts each slot's tokens into runs of
at most TILE, and the SGMV kernels (lora_sgmv) give one program's block of tokens exactly TILE rows. One constant for
both, since a run longer than the block would lose tokens."""
TILE = 16

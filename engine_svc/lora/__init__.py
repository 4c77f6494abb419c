"""Multi-LoRA serving: PEFT adapters read and validated (peft_adapter), kept in CPU memory and device slots with LRU
(manager), applied per token by wrapped projections (layers) through Triton SGMV kernels or the torch path."""

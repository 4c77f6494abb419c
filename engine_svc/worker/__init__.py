"""The worker side of the engine: what holds and runs the model (the model runner, its persistent input buffers,
decode CUDA graphs, memory plan, GPU timeline) and, under tensor parallelism, the per-step plan broadcast and the
worker process of each rank beyond the driver."""

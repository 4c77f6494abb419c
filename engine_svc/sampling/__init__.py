"""Turning a step's logits into tokens: logits processors, the batched sampler and logprobs."""

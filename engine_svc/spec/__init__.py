"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the rejection sampler that verifies
their proposals. The scheduler (plain Python) asks a proposer for up to K tokens per decoding request, the target
model computes the request's last token and the K proposals in one forward over K + 1 positions, and the
rejection sampler keeps the longest accepted prefix plus one token of the target's own. See the README."""

"""Plain-Python engine core: request state, KV block accounting and scheduling. Never imports torch."""

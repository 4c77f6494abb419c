"""The engine's service side: the gRPC servicer, the loop thread that drives the Engine, and the proto <-> engine
conversions. Nothing below this package imports it."""

"""The `tandem` command and the launcher that starts the stack: not the gateway service.

It lives under gateway/ because the repository's top level is fixed (protos/, tokenizer_svc/, engine_svc/, gateway/,
benchmarks/, tests/), but no module of the gateway service imports it (tests/cli/test_cli_package_apart.py checks):
the command starts the three services as processes and talks to them only over gRPC, like any client.
"""

"""`python -m gateway.cli ARGS` is `tandem ARGS`."""
from gateway.cli.main import main

main()

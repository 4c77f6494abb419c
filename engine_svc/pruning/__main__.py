import sys

from engine_svc.pruning.prune_command import main

sys.exit(main())

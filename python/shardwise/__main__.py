"""``python -m shardwise``: the ``shardwise`` command."""

import os
import sys

try:
    from .cli.app import main
except KeyboardInterrupt:  # Ctrl-C while the command itself was still being imported: as cli.main does
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    print(f"shardwise{' ' + command if command else ''}: interrupted", file=sys.stderr, flush=True)
    os._exit(130)

raise SystemExit(main())

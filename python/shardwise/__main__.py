"""``python -m shardwise``: the ``shardwise`` command."""

from .cli import main

raise SystemExit(main())

"""Allow ``python -m bids_harmony``."""

from bids_harmony.cli.run import main

raise SystemExit(main())

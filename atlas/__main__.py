"""``python -m atlas``: the same command line as the ``atlas`` script."""

from atlas.cli import main

raise SystemExit(main())

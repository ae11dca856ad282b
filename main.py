"""Entry point: ``python main.py --image cat.png --hash3d`` (see ``--help``)."""

import sys

from hash3d_dg.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())

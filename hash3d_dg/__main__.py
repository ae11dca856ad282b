import sys

from hash3d_dg.apps.cli import main

sys.exit(main())

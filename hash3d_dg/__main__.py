import sys

from hash3d_dg.cli import main

sys.exit(main())

import sys

from hash3d_dg.preprocess.command import main

sys.exit(main())

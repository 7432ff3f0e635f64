"""``python -m bench``: run the suite."""

import sys

from bench.run import main

sys.exit(main())

"""``python -m produl_server``: the ``produl-server`` command."""

import sys

from produl_server.cli import main

if __name__ == "__main__":
    sys.exit(main())

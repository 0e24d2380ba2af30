"""``python -m distclip.verify`` and ``torchrun ... -m distclip.verify``: see ``cli``."""

import sys

from distclip.verify.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m img2vid`: the same as the `img2vid` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

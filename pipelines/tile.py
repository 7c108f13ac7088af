"""Entry point for `make tile`: the same as `wsi-mil tile ...`."""

import sys

from wsi_mil.cli import main

if __name__ == "__main__":
    sys.exit(main(["tile", *sys.argv[1:]]))

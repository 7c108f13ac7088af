"""Entry point for `make extract`: the same as `wsi-mil extract ...`."""

import sys

from wsi_mil.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))

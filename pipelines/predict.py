"""Entry point for `make predict`: the same as `wsi-mil predict ...`."""

import sys

from wsi_mil.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))

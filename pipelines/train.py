"""Entry point for `make train`: the same as `wsi-mil train ...`."""

import sys

from wsi_mil.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

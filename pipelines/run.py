"""Entry point for `make run`: the same as `wsi-mil run ...`."""

import sys

from wsi_mil.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

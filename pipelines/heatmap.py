"""Entry point for `make heatmap`: the same as `wsi-mil heatmap ...`."""

import sys

from wsi_mil.cli import main

if __name__ == "__main__":
    sys.exit(main(["heatmap", *sys.argv[1:]]))

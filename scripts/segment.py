#!/usr/bin/env python
"""Headless `lungseg segment` (same arguments; see `--help`). A thin shell over the lungseg package."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))

"""Deprecated location of the console command: use :mod:`beyondgrad.app.cli`."""

import warnings

from .app.cli import build_parser, main

warnings.warn("beyondgrad.cli moved to beyondgrad.app.cli", DeprecationWarning, stacklevel=2)

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())

"""``python -m beyondgrad.app`` = the ``beyondgrad`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m dagfm_ext``: the same command line as ``dagfm-ext``."""
import sys

from .cli import main

sys.exit(main())

"""``python -m dagfm_ext.bench``: the same as ``dagfm-ext bench``."""
import argparse
import sys

from . import __doc__ as _doc
from . import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m dagfm_ext.bench", description=_doc.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

"""``python -m spikeops``: the command line of python/spikeops/cli.py."""

import sys

from .cli import main

sys.exit(main())

"""``python -m tapml``: the command line, also from a source tree (``PYTHONPATH=. python -m tapml``)."""

import sys

from .cli import main

sys.exit(main())

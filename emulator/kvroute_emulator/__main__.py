"""``python -m kvroute_emulator``: see :mod:`kvroute_emulator.cli`."""

import sys

from kvroute_emulator.cli import main

sys.exit(main())

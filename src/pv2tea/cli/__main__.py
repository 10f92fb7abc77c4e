"""``python -m pv2tea.cli``: the ``pv2tea`` command (as launchers such as ``accelerate launch -m`` run it)."""

import sys

from pv2tea.cli import main

if __name__ == "__main__":
    sys.exit(main())

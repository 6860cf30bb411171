"""``python -m mlearn`` is the ``mlearn`` command."""
import sys

from mlearn.cli import main

sys.exit(main())

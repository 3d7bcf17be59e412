"""``python -m spot ...`` is the ``spot`` console script."""
import sys

from .cli import main

sys.exit(main())

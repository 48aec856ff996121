"""``python -m structkit ...`` is the ``structkit`` command (works under torchrun too)."""
import sys

from .cli import main

sys.exit(main())

"""``python -m orpo`` and ``accelerate launch -m orpo`` enter here."""

import sys

from .cli import main

sys.exit(main())

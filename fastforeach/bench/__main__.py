"""`python -m fastforeach.bench`: the benchmark command (see `cli.py`)."""
import sys

from .cli import main

sys.exit(main())

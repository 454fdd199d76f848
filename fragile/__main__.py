"""`python -m fragile ...` is the `fragile` command."""
import sys

from fragile.cli import main

sys.exit(main())

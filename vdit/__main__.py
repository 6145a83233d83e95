"""`python -m vdit` is the same as the `vdit` command."""

import sys

from vdit.cli import main

sys.exit(main())

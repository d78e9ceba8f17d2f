"""`python -m star ...` runs the `star` command."""

import sys

from star.cli.main import main

sys.exit(main())

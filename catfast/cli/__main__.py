"""``python -m catfast.cli``: the `catfast` command."""

import sys

from catfast.cli import main

sys.exit(main())

"""``python -m tollway.cli``."""

import sys

from tollway.cli.main import main

sys.exit(main())

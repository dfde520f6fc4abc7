"""``python -m omnistream.bench``."""

import sys

from omnistream.bench import main

sys.exit(main())

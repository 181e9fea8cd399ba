"""`python -m service.cli`: the `specserve` console script."""

import sys

from service.cli import main

sys.exit(main())

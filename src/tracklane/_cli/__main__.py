"""``python -m tracklane._cli``: the ``tracklane`` console script."""

import sys

from . import main

sys.exit(main())

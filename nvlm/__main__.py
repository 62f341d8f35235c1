"""``python -m nvlm``: the ``nvlm`` command line (``nvlm.cli``)."""

import sys

from nvlm.cli import main

sys.exit(main())

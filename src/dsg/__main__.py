"""`python -m dsg ...` (and `torchrun ... -m dsg fit ...`): the `dsg` command line."""

import sys

from .entry import main

sys.exit(main())

"""``python -m bilinear_lens``: the same as the ``bilinear-lens`` command."""

import sys

from bilinear_lens.cli import main

sys.exit(main())

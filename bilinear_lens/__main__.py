import sys

from bilinear_lens.cli import main

sys.exit(main())

"""``python -m input_pipeline.synthetic``: see :mod:`input_pipeline.synthetic.cli`."""

import sys

from input_pipeline.synthetic.cli import main

sys.exit(main())

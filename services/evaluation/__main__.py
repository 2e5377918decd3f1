"""`python -m services.evaluation {sync,output,shape} ...` (see cli.py)."""

import sys

from services.evaluation.cli import main

sys.exit(main())

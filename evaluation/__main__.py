"""`python -m evaluation {sync,output,shape} ...` (see cli.py)."""

import sys

from evaluation.cli import main

sys.exit(main())

"""`python -m deploy.bench`: the end-to-end benchmark (`a2v bench`, `make bench`)."""

import sys

from deploy.bench.end_to_end import main

sys.exit(main())

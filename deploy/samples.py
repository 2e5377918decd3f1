"""Where the real sample clips and speech live: `../shared/data` beside the repository, or $A2V_SAMPLE_DATA."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = Path(os.environ.get("A2V_SAMPLE_DATA") or REPO.parent / "shared" / "data")

"""``python -m bench [--quick] [--out DIR] [--cases ...]`` (from the repository root): the suite."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import main  # noqa: E402

sys.exit(main(prog="python -m bench"))

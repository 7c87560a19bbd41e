"""``python -m pipeline.export.native``: build the kernel library (what ``make setup`` runs)."""

import sys

from pipeline.export.native import NativeBuildError, build

try:
    print(build())
except NativeBuildError as err:
    sys.exit(str(err))

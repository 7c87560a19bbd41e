"""``python -m pipeline.model.kernels``: build the MoE training kernel (what ``make setup`` runs)."""

import sys

from pipeline.cbuild import NativeBuildError
from pipeline.model.kernels import load

try:
    print(load())
except NativeBuildError as err:
    sys.exit(str(err))

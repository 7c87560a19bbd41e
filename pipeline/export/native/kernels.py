"""Importing this module registers the project's C++ kernels in ExecuTorch's runtime
(the ``python_import`` of the ``mobilemoe`` kernel library in a program's kernel list)."""

from pipeline.export.native import load

load()

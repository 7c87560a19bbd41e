"""Quantization of the model: QAT fake quantization (fake.py), convert and PTQ
(convert.py), the coverage table (coverage.py) and the on-disk format (format.py).

Only the config is imported here: validating a recipe config must not import torchao.
Domain code: imports neither Ray, MLflow nor the recipe config (pyproject's contracts).
"""

import logging

from pipeline.quant.config import QuantConfig, quantized_input_dims

# torchao's CPU wheel warns on import that its CUDA-only kernels (mxfp8, cutlass) do not
# load: expected on a CPU machine, and noise in every QAT log. Only that message is dropped.
logging.getLogger("torchao").addFilter(lambda record: not record.getMessage().startswith("Failed to load"))

__all__ = ["QuantConfig", "quantized_input_dims"]

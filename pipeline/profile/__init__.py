"""On-device profiling of exported ExecuTorch programs: TTFT, prefill and decode tok/s
(ExecuTorch LLM-runner definitions), peak memory, the decode bandwidth bound and the
expert load, for the MoE and its dense twins side by side."""

# Installs the filter for torchao's CUDA-only kernel warnings before anything here
# imports executorch (which imports torchao), also in the spawned memory probes.
import pipeline.quant  # noqa: F401

"""On-device profiling of exported ExecuTorch programs: TTFT, prefill and decode tok/s
(ExecuTorch LLM-runner definitions), peak memory, the decode bandwidth bound and the
expert load, for the MoE and its dense twins side by side."""

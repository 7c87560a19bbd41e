"""tools/gpu_check.py, the prepared GPU run, on CPU: the same code but CUDA itself."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import gpu_check  # noqa: E402


def test_the_gpu_check_runs_parity_and_throughput_on_cpu(micro_data, capsys):
    args = ["--device", "cpu", "--mixture", str(micro_data / "pretrain"), "--model", "micro", "--parity-model", "micro"]
    args += ["--parity-steps", "4", "--steps", "4", "--warmup", "1", "--batch", "2", "--seq-len", "64"]
    assert gpu_check.main([*args, "--eval-batches", "2"]) == 0
    out = capsys.readouterr().out
    parity = re.search(r"FP32 ([\d.]+), FP32 seed 1 ([\d.]+), BF16 ([\d.]+); \|BF16-FP32\| ([\d.]+)", out)
    assert parity and "PASS" in out, out
    fp32, _, bf16, gap = map(float, parity.groups())
    assert gap == pytest.approx(abs(bf16 - fp32), abs=2e-4) and 0 < gap  # BF16 did run: not FP32 twice
    rate = re.search(r"throughput \(micro on cpu, BF16, 4 steps of 2x64\): ([\d,]+) tokens/s", out)
    assert rate and int(rate.group(1).replace(",", "")) > 0, out
    assert "peak RSS" in out


def test_the_gpu_check_names_a_missing_gpu_or_mixture_before_training(micro_data, tmp_path, capsys):
    if not gpu_check.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--mixture", str(micro_data / "pretrain")])
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--mixture", str(tmp_path)])
    assert f"--mixture {tmp_path}: not a built mixture" in capsys.readouterr().err

"""benchmarks/bench_crf.py's ``--isa avx2``: the rerun really dispatches PyTorch's kernels to AVX2 code."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_crf.py"


def _header(*flags: str) -> str:
    # the cuda section is the quickest: without a GPU it prints one line
    done = subprocess.run([sys.executable, str(BENCH), "--only", "cuda", *flags], capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.splitlines()[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="needs an x86 CPU with AVX2")
def test_isa_avx2_reruns_with_avx2_kernels():
    native = torch.backends.cpu.get_cpu_capability()
    assert _header().endswith(f"PyTorch's CPU kernels: {native}")
    assert "PyTorch's CPU kernels: AVX2 (--isa avx2" in _header("--isa", "avx2")

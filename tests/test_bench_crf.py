"""benchmarks/bench_crf.py: ``--isa avx2`` really dispatches PyTorch's kernels to AVX2 code; ``--only small``
reports the exact filter at the exact CRF."""

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


@pytest.mark.slow
def test_small_section_reports_the_exact_filter_at_the_exact_crf():
    # bench_crf --only small: every size's row, the exact filter within 1e-5 of the exact dense CRF (mean |ΔQ|)
    # and the lattice and densecrf further from it than the exact filter on the noise images
    done = subprocess.run([sys.executable, str(BENCH), "--only", "small", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300, check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.endswith(tuple("0123456789")) and "×" in line
            and " C" in line]
    assert len(rows) == 12, done.stdout
    for row in rows:
        lattice, exact, densecrf = (float(x) for x in row[-3:])
        assert exact < 1e-5, row
        if row[2] == "noise":
            assert lattice > 100 * exact and densecrf > 100 * exact, row

"""Allocator tuning for CPU runs."""

import platform

import pytest

from crfrnn_deeplab.allocator import retain_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_settings():
    assert retain_freed_memory() is True


def test_never_raises():
    assert isinstance(retain_freed_memory(mmap_threshold=2**40, trim_threshold=2**40), bool)

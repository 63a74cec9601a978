"""crfrnn_deeplab/files.py: a file written whole, or left as it was."""

import errno
import os

import pytest

from crfrnn_deeplab.files import atomic_write, blocking_parent
from crfrnn_deeplab.weights.checkpoint import remove_stale_temporaries


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write(b"new, but")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_atomic_write_replaces_a_link_not_the_file_behind_it(tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep")
    hard, soft = tmp_path / "hard.bin", tmp_path / "soft.bin"
    os.link(target, hard)
    soft.symlink_to(target)
    for link in (hard, soft):
        with atomic_write(link) as f:
            f.write(b"new")
        assert link.read_bytes() == b"new" and not link.is_symlink()
    assert target.read_bytes() == b"keep"


def test_atomic_write_uses_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x.bin") as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644


def test_blocking_parent_is_the_first_parent_that_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert blocking_parent(tmp_path / "file" / "a" / "b.pt") == tmp_path / "file"
    assert blocking_parent(tmp_path / "dangling" / "b.pt") == tmp_path / "dangling"  # mkdir would fail there too
    assert blocking_parent(tmp_path / "new" / "b.pt") is None


@pytest.mark.parametrize("name", ["a" * 251 + ".pt", "é" * 124 + "a.pt", "x" * 240 + ".pt"])
def test_atomic_write_takes_every_legal_name(tmp_path, name):
    # a name of 242-255 bytes is legal, but its temporary ".<name>.<8 hex>.tmp" was not: "File name too long"
    assert len(os.fsencode(name)) <= 255
    seen = []
    with atomic_write(tmp_path / name) as f:
        seen += os.listdir(tmp_path)
        f.write(b"data")
    assert (tmp_path / name).read_bytes() == b"data" and os.listdir(tmp_path) == [name]
    temporary = seen[0]
    assert len(os.fsencode(temporary)) <= 255 and temporary.startswith(".") and temporary.endswith(".tmp")
    assert temporary[:-len(".01234567.tmp")].endswith(".pt")  # what remove_stale_temporaries looks for
    temporary.encode("utf-8")  # whole characters: no half of an "é" at the cut
    (tmp_path / temporary).touch()
    remove_stale_temporaries(tmp_path)
    assert os.listdir(tmp_path) == [name]


def test_a_failed_write_names_the_file_it_was_writing(tmp_path):
    # a full disk raises "[Errno 28] No space left on device" naming no file: the error says which one
    path = tmp_path / "results.json"
    with pytest.raises(OSError) as e:
        with atomic_write(path) as f:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path) and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError) as e:  # one that names its file keeps it
        with atomic_write(path):
            open(tmp_path / "missing")
    assert e.value.filename == str(tmp_path / "missing")
    with pytest.raises(OSError, match="^a message of its own$"):  # no errno: not the operating system's, kept
        with atomic_write(path):
            raise OSError("a message of its own")

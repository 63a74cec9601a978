"""Checkpoint files: atomic writes and safe, clearly-failing reads."""

import os
import stat

import pytest
import torch

from crfrnn_deeplab.weights.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint


class _Opaque:  # a pickled class: weights_only loading must refuse it
    pass


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "last.pt", {"model": {"w": torch.arange(3.0)}, "step": 7})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["step"] == 7
    torch.testing.assert_close(ckpt["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.zeros(100)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt.*not a readable"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_checkpoint(text)
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": _Opaque()}, pickled)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(pickled)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(listed)


@pytest.mark.parametrize("cut", [10, 100, 1000])
def test_truncated_legacy_file_gives_a_reason(tmp_path, cut):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1000), "b": torch.ones(5)}, legacy, _use_new_zipfile_serialization=False)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(legacy.read_bytes()[:cut])  # the unpickler's EOFError carries no message
    with pytest.raises(CheckpointError, match=r"truncated\.pt is not a readable PyTorch checkpoint") as info:
        load_checkpoint(truncated)
    reason = str(info.value).rpartition("(truncated or corrupt, or another kind of file): ")[2]
    assert reason.strip(), str(info.value)


def test_checkpoints_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "new.pt", {"step": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0o666 less the umask, like any file the user writes
        path.chmod(0o640)
        save_checkpoint(path, {"step": 2})  # a new file replaces the old one whole: the usual mode again
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 and load_checkpoint(path)["step"] == 2
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["new.pt"]


def test_writing_below_a_file_says_so(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"cannot write .*file/sub/last\.pt: .*file is not a directory"):
        save_checkpoint(tmp_path / "file" / "sub" / "last.pt", {"step": 1})
    assert (tmp_path / "file").read_text() == "x"


def test_every_truncation_of_an_archive_names_the_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.zeros(1000)}})
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in range(4, len(data), 37):  # past ~4 KiB torch's reader seeks beyond the end: OSError(EINVAL)
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable PyTorch checkpoint \(truncated or corr"):
            load_checkpoint(cut)


def test_flipped_bits_in_a_tensor_are_found_by_the_archives_checksums(tmp_path):
    # torch.load does not check the zip members' CRC-32: damaged weights loaded as different weights
    weights = torch.arange(1000, dtype=torch.float32) + 0.5
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": weights}})
    data = bytearray(good.read_bytes())
    at = bytes(data).index(weights.numpy().tobytes()[:64]) + 1000  # inside the tensor's stored bytes
    data[at] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged\.pt is corrupt: its member .* does not match its CRC-32"):
        load_checkpoint(damaged)
    torch.testing.assert_close(load_checkpoint(good)["model"]["w"], weights)


class _System:  # unpickling it would call os.system
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_a_blocked_global_is_named_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _System()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(info.value)
    assert f"it pickles the global {os.system.__module__}.system, which weights_only loading does not allow" in message
    assert "Check the documentation" not in message and not (tmp_path / "pwned.txt").exists()


def test_a_directory_or_fifo_as_checkpoint_is_named_not_missing(tmp_path):
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"folder\.pt is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path / "folder.pt")
    if hasattr(os, "mkfifo"):  # reading a FIFO would block until a writer came
        os.mkfifo(tmp_path / "pipe.pt")
        with pytest.raises(CheckpointError, match=r"pipe\.pt is not a regular file, not a checkpoint file"):
            load_checkpoint(tmp_path / "pipe.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")

"""moekit.io: the checkpoint writer's contract, on plain byte files."""

from __future__ import annotations

import json
import os

import pytest

from moekit.io import (
    MANIFEST,
    CheckpointError,
    CheckpointWriter,
    NoManifestError,
    atomic_write,
    clean_checkpoint,
    read_checkpoint,
    write_checkpoint,
)


def test_roundtrip_meta_and_one_directory_per_save(tmp_path):
    ck = write_checkpoint(tmp_path, {"a.bin": b"hello", "b.txt": lambda p: p.write_text("world")}, kind="t/1",
                          meta={"step": 3})
    again = read_checkpoint(tmp_path, kind="t/1")
    assert again.save_id == ck.save_id and again.meta == {"step": 3} and sorted(again.files) == ["a.bin", "b.txt"]
    assert again.path("a.bin").read_bytes() == b"hello"
    second = write_checkpoint(tmp_path, {"a.bin": b"bye"}, kind="t/1")
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, f"save-{second.save_id}"]  # the previous save is gone
    with pytest.raises(CheckpointError, match="holds a 't/1' checkpoint, expected 'u/1'"):
        read_checkpoint(tmp_path, kind="u/1")
    with pytest.raises(CheckpointError, match="has no file 'b.txt'"):
        read_checkpoint(tmp_path).path("b.txt")


def test_a_failing_save_leaves_the_previous_one(tmp_path):
    first = write_checkpoint(tmp_path, {"a.bin": b"one"}, kind="t/1")

    def boom(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path, {"a.bin": b"two", "b.bin": boom}, kind="t/1")
    ck = read_checkpoint(tmp_path)
    assert ck.save_id == first.save_id and ck.path("a.bin").read_bytes() == b"one"
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, f"save-{first.save_id}"]


def test_leftovers_of_a_crash_are_cleaned_by_the_next_save(tmp_path):
    write_checkpoint(tmp_path, {"a.bin": b"one"}, kind="t/1")
    w = CheckpointWriter(tmp_path, kind="t/1")  # a save that "crashed" before its commit
    w.write("a.bin", b"two")
    (tmp_path / ".manifest.json.123.tmp").write_text("{")
    assert read_checkpoint(tmp_path).path("a.bin").read_bytes() == b"one"  # never read
    assert len(clean_checkpoint(tmp_path)) == 2
    assert len(os.listdir(tmp_path)) == 2


def test_bad_names_missing_manifest_and_bad_manifest(tmp_path):
    with pytest.raises(ValueError, match="bad file name"):
        write_checkpoint(tmp_path / "x", {"../a": b""}, kind="t/1")
    with pytest.raises(NoManifestError, match="has no manifest.json"):
        read_checkpoint(tmp_path / "x")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        read_checkpoint(tmp_path / "nope")
    write_checkpoint(tmp_path / "y", {"a": b"1"}, kind="t/1")
    m = json.loads((tmp_path / "y" / MANIFEST).read_text())
    m["version"] = 99
    (tmp_path / "y" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="its checksum does not match"):
        read_checkpoint(tmp_path / "y")


def test_atomic_write_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "f", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640 and os.listdir(tmp_path) == ["f"]

"""Atomic writes (upq_hf.atomic): nothing half-written is ever visible under the target's name."""

from __future__ import annotations

import os

import pytest

from upq_hf.atomic import atomic_path, write_text


def test_file_written_whole_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "results.json"
    write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_failure_leaves_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_folder_replaces_an_existing_one_whole(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "stale.bin").write_text("stale")
    with atomic_path(target, folder=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".checkpoint.") and not target.joinpath("new").exists()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # neither the temporary nor the old copy
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, folder=True) as tmp:
            (tmp / "partial").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["new"] and len(list(tmp_path.iterdir())) == 1

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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_folder_gets_the_mode_a_plain_mkdir_gives(tmp_path, umask):
    """mkdtemp makes the temporary 0o700; the folder renamed into place gets 0o777 less the umask."""
    before = os.umask(umask)
    try:
        with atomic_path(tmp_path / "checkpoint", folder=True) as tmp:
            (tmp / "config.json").write_text("{}")
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(before)
    mode = (tmp_path / "checkpoint").stat().st_mode & 0o777
    assert mode == 0o777 & ~umask == (tmp_path / "plain").stat().st_mode & 0o777
    assert mode == (0o755 if umask == 0o022 else 0o700)


def test_temporaries_of_a_dead_writer_are_removed_and_a_live_writers_kept(tmp_path):
    import subprocess
    import sys

    from upq_hf.atomic import clean_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".q.tmp-{pid}-abc").mkdir()
    (tmp_path / f".q.tmp-{pid}-abc" / "model.safetensors").write_text("half")
    (tmp_path / f".q.tmp-{os.getpid()}-live").mkdir()  # a writer still running (this process)
    (tmp_path / f".other.tmp-{pid}-x").mkdir()  # another target's
    assert [p.name for p in clean_stale(tmp_path / "q")] == [f".q.tmp-{pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{pid}-x", f".q.tmp-{os.getpid()}-live"]

"""The supervisor's runtime directory: locked while alive, removed once abandoned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kumoproxy import runtime_dir
from kumoproxy.runtime_dir import RuntimeDir, remove_stale


def test_a_live_supervisors_directory_is_kept(tmp_path: Path) -> None:
    live = RuntimeDir.create(tmp_path)
    try:
        removed = remove_stale(tmp_path)
        assert removed == []
        assert live.metrics.is_dir()
    finally:
        live.remove()
    assert not live.path.exists()


def test_a_dead_supervisors_directory_is_removed(tmp_path: Path) -> None:
    dead = RuntimeDir.create(tmp_path)
    dead.limits_table.write_bytes(b"\0" * 4096)
    os.close(dead.lock_fd)  # as the kernel does when its process dies
    live = RuntimeDir.create(tmp_path)
    try:
        removed = remove_stale(tmp_path)
        assert removed == [dead.path]
        assert not dead.path.exists()
        assert live.path.exists()
    finally:
        live.remove()


def test_a_directory_without_its_lock_yet_is_left_for_a_minute(tmp_path: Path) -> None:
    setting_up = tmp_path / (runtime_dir.PREFIX + "early")
    setting_up.mkdir()
    mtime = setting_up.stat().st_mtime
    assert remove_stale(tmp_path, now=mtime + 10) == []
    assert remove_stale(tmp_path, now=mtime + runtime_dir.UNLOCKED_GRACE + 1) == [setting_up]
    assert not setting_up.exists()


def test_symlinks_and_other_names_are_never_touched(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    (tmp_path / (runtime_dir.PREFIX + "link")).symlink_to(elsewhere)
    other = tmp_path / "not-ours"
    other.mkdir()
    assert remove_stale(tmp_path, now=1e12) == []
    assert (elsewhere / "precious").read_text() == "keep"
    assert other.exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_another_users_directory_is_left_alone(tmp_path: Path) -> None:
    theirs = RuntimeDir.create(tmp_path)
    os.close(theirs.lock_fd)
    os.chown(theirs.path, 65534, 65534)
    assert remove_stale(tmp_path, now=1e12) == []
    assert theirs.path.exists()

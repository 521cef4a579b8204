"""`silotune.files`: state directories private to the service's user, and the deployment
commands' umask (deploy/README.md, "Hardening")."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from silotune.cli import main
from silotune.deploy import cli
from silotune.files import PRIVATE_UMASK, private_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_directory_is_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        made = private_dir(tmp_path / "var" / "state")
    finally:
        os.umask(old)
    assert made == tmp_path / "var" / "state" and _mode(made) == 0o700


def test_an_existing_open_state_directory_is_tightened(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (state / "ledger.jsonl").write_text("{}\n")
    private_dir(state)
    assert _mode(state) == 0o700
    assert (state / "ledger.jsonl").read_text() == "{}\n"


def test_a_shared_folder_is_refused_and_left_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(PermissionError, match=r"shared folder .*a folder of its own inside "
                       r"it, e\.g\. .*shared/state"):
        private_dir(shared)
    assert _mode(shared) == 0o1777


def test_another_users_folder_names_the_fix(tmp_path, monkeypatch):
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o775)
    volume.chmod(0o775)

    def refuse(path, mode):  # what chmod does to a folder of another user (root may)
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refuse)
    with pytest.raises(PermissionError, match=r"belongs to another user.*0700.*volume/state"):
        private_dir(volume)


def test_deployment_jobs_create_private_files_and_restore_the_umask(tmp_path, monkeypatch):
    def job(args: argparse.Namespace) -> int:
        (tmp_path / "made").mkdir()
        (tmp_path / "made" / "superlink.db").write_bytes(b"")
        return 0

    monkeypatch.setitem(cli.DEPLOY_JOBS, "coordinator", job)
    before = os.umask(0o022)
    try:
        assert cli.run_deploy_job(argparse.Namespace(job="coordinator")) == 0
        after = os.umask(0o022)
    finally:
        os.umask(before)
    assert after == 0o022 and PRIVATE_UMASK == 0o077
    assert _mode(tmp_path / "made") == 0o700
    assert _mode(tmp_path / "made" / "superlink.db") == 0o600


def test_a_state_directory_that_cannot_be_made_private_exits_2_with_the_fix(
        tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert main(["coordinator", "--state-dir", str(shared), "--insecure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silotune coordinator: error: ") and "folder of its own" in err

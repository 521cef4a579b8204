"""The consortium's app signature (deploy/app_signing.py), the signed copy `silotune run`
submits (deploy/submit.py), the silo's verifying ClientApp gate
(deploy/verified_clientapp.py) and the agent's hold on its SuperNode (deploy/agent.py),
on real FABs built by Flower's own `build_fab_from_disk` and real processes."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from silotune.deploy import app_signing, certs, verified_clientapp
from silotune.deploy.agent import (
    GATE_DIR,
    AgentError,
    AgentSettings,
    check_app_key,
    supernode_env,
)
from silotune.deploy.app_signing import SIGNATURE_FILE, AppSignatureError
from silotune.deploy.connection import Connection, DeployError
from silotune.deploy.submit import signed_app

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "consortium"

[tool.flwr.app.components]
serverapp = "tinyapp.app:server_app"
clientapp = "tinyapp.app:client_app"

[tool.flwr.app.config]
rounds = 1
"""


@pytest.fixture
def keys(tmp_path):
    """The operator's key pair and a stranger's, as `silotune certs --app-signing` makes
    them."""
    certs.create_material(tmp_path / "operator", app_signing=True)
    certs.create_material(tmp_path / "stranger", app_signing=True)
    return {who: (app_signing.load_private_key(tmp_path / who / certs.APP_SIGNING_KEY),
                  app_signing.load_public_key(tmp_path / who / certs.APP_SIGNING_PUB))
            for who in ("operator", "stranger")}


def make_app(root: Path) -> Path:
    app = root / "tinyapp"
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "app.py").write_text("client_app = server_app = None\n")
    (app / "README.md").write_text("# tiny\n")
    (app / ".gitignore").write_text("local_secrets.py\n")
    (app / "local_secrets.py").write_text("TOKEN = 'never in a FAB'\n")
    return app


@pytest.fixture
def signed_fab(tmp_path, keys) -> bytes:
    """The FAB `flwr run` builds from the signed copy `silotune run` submits."""
    return build_fab_from_disk(signed_app(make_app(tmp_path), keys["operator"][0],
                                          tmp_path / "submitted"))


def rezip(fab: bytes, change: dict[str, bytes | None]) -> bytes:
    """`fab` with the entries in `change` replaced (None: removed) or added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name not in change:
                dst.writestr(name, src.read(name))
        for name, data in change.items():
            if data is not None:
                dst.writestr(name, data)
    return out.getvalue()


def test_the_signature_covers_exactly_the_fab_flower_builds(tmp_path, keys, signed_fab):
    public = keys["operator"][1]
    files = app_signing.fab_files(signed_fab)
    assert app_signing.verify_fab(signed_fab, public) == len(files) - 1  # all but itself
    assert sorted(files) == sorted([
        "README.md", SIGNATURE_FILE, "pyproject.toml", "tinyapp/__init__.py",
        "tinyapp/app.py"])  # .gitignore'd local_secrets.py is in neither FAB nor signature
    # an app that already carries a (stale) signature is signed afresh
    app = tmp_path / "tinyapp"
    (app / SIGNATURE_FILE).write_bytes(files[SIGNATURE_FILE])
    (app / "tinyapp" / "app.py").write_text("client_app = server_app = 'v2'\n")
    again = build_fab_from_disk(signed_app(app, keys["operator"][0], tmp_path / "v2"))
    assert app_signing.verify_fab(again, public) == 4
    assert app_signing.fab_files(again)[SIGNATURE_FILE] != files[SIGNATURE_FILE]


@pytest.mark.parametrize(("change", "refused"), [
    ({"tinyapp/app.py": b"import os; os.system('curl evil')\n"}, "was changed after"),
    ({"tinyapp/extra.py": b"print('hi')\n"}, "does not cover"),
    ({".info/extra": b"x"}, "does not cover"),
    ({"README.md": None}, "lacks 1 signed file"),
    ({SIGNATURE_FILE: None}, f"carries no {SIGNATURE_FILE}"),
    ({SIGNATURE_FILE: b"{not json"}, "malformed"),
], ids=["tampered", "extra", "extra-info", "missing-file", "no-signature", "garbage"])
def test_an_altered_app_is_refused(keys, signed_fab, change, refused):
    with pytest.raises(AppSignatureError, match=refused):
        app_signing.verify_fab(rezip(signed_fab, change), keys["operator"][1])


def test_another_key_or_a_forged_listing_is_refused(tmp_path, keys, signed_fab):
    operator_key, stranger_key = keys["operator"][0], keys["stranger"][0]
    public = keys["operator"][1]
    with pytest.raises(AppSignatureError, match=r"signed with key \w+, but this silo pins"):
        app_signing.verify_fab(signed_fab, keys["stranger"][1])
    strangers = build_fab_from_disk(signed_app(tmp_path / "tinyapp", stranger_key,
                                               tmp_path / "stranger-app"))
    with pytest.raises(AppSignatureError, match="pins key"):
        app_signing.verify_fab(strangers, public)
    # the stranger's listing claiming the operator's key id does not verify
    files = app_signing.fab_files(strangers)
    forged = files[SIGNATURE_FILE].replace(
        app_signing.key_id(stranger_key.public_key()).encode(),
        app_signing.key_id(operator_key.public_key()).encode())
    with pytest.raises(AppSignatureError, match="does not verify with the pinned key"):
        app_signing.verify_fab(rezip(strangers, {SIGNATURE_FILE: forged}), public)
    with pytest.raises(AppSignatureError, match="not a zip archive"):
        app_signing.verify_fab(b"PK-but-not-really", public)


def test_a_gitignore_that_drops_the_signature_fails_before_submission(tmp_path, keys):
    app = make_app(tmp_path)
    (app / ".gitignore").write_text("*.json\n")
    with pytest.raises(DeployError, match=f"does not carry a valid {SIGNATURE_FILE}.*"
                                          r"\.gitignore"):
        signed_app(app, keys["operator"][0], tmp_path / "submitted")


def test_app_signing_keys_are_made_safely_and_named_when_wrong(tmp_path):
    out = tmp_path / "operator"
    made = certs.create_material(out, app_signing=True)
    assert sorted(p.name for p in made.written) == [certs.APP_SIGNING_KEY,
                                                   certs.APP_SIGNING_PUB]
    assert stat.S_IMODE((out / certs.APP_SIGNING_KEY).stat().st_mode) == 0o600
    before = (out / certs.APP_SIGNING_KEY).read_bytes()
    again = certs.create_material(out, app_signing=True)
    assert not again.written and (out / certs.APP_SIGNING_KEY).read_bytes() == before
    with pytest.raises(AppSignatureError, match=r"does not exist.*certs --app-signing"):
        app_signing.load_public_key(tmp_path / "app-signing.pub")
    certs.create_material(tmp_path / "silo", silos=["h1"])
    with pytest.raises(AppSignatureError, match="not a PEM public key"):
        app_signing.load_public_key(tmp_path / "silo" / "silos" / "h1" / "node.pub")
    with pytest.raises(AppSignatureError, match="not an Ed25519 key"):
        app_signing.load_private_key(
            _pem_ec_key(tmp_path / "ec.key"))


def _pem_ec_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def test_the_gate_installs_only_a_signed_app(monkeypatch, keys, signed_fab):
    forgotten: list[bool] = []
    monkeypatch.setattr(verified_clientapp, "_forget_own_package",
                        lambda: forgotten.append(True))
    installed: list[bytes] = []

    def install(fab, *_args, **_kwargs):
        installed.append(fab)
        return Path("/installed")

    gate = verified_clientapp.verified_install(install, keys["operator"][1])
    assert gate(signed_fab, skip_prompt=True) == Path("/installed")
    assert installed == [signed_fab] and forgotten == [True]
    with pytest.raises(AppSignatureError, match="carries no"):
        gate(rezip(signed_fab, {SIGNATURE_FILE: None}), skip_prompt=True)
    with pytest.raises(AppSignatureError, match="pins key"):
        verified_clientapp.verified_install(install, keys["stranger"][1])(signed_fab)
    assert installed == [signed_fab]  # nothing refused reached Flower's installer


def test_the_gate_folder_verifies_clientapps_and_refuses_other_tasks(tmp_path):
    certs.create_material(tmp_path, app_signing=True)
    gate = verified_clientapp.write_gate(tmp_path / "gate", tmp_path / "app-signing.pub")
    clientapp = (gate / "flwr-clientapp").read_text()
    assert f"-P -m {verified_clientapp.MODULE} --app-key" in clientapp
    assert str((tmp_path / "app-signing.pub").resolve()) in clientapp
    assert stat.S_IMODE((gate / "flwr-clientapp").stat().st_mode) == 0o700
    agentapp = subprocess.run([str(gate / "flwr-agentapp"), "--token", "t"],
                              capture_output=True, text=True, check=False)
    assert agentapp.returncode == 1
    assert agentapp.stderr.startswith(verified_clientapp.REFUSED)
    # the script reaches Flower's own flwr-clientapp, with the key loaded
    usage = subprocess.run([str(gate / "flwr-clientapp"), "--help"], capture_output=True,
                           text=True, check=False, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert usage.returncode == 0 and "--runtime-api-address" in usage.stdout, usage.stderr


def _settings(tmp_path, **kwargs) -> AgentSettings:
    from silotune.client.node import NodeSettings

    node = NodeSettings(silo_id="a", data_path=tmp_path / "d.jsonl",
                        state_dir=tmp_path / "s", epsilon=8.0, delta=1e-5)
    return AgentSettings(connection=Connection("127.0.0.1:1", None, insecure=True),
                         key=None, node=node, **kwargs)


def test_an_agent_needs_a_pinned_app_key_or_an_explicit_opt_out(tmp_path):
    with pytest.raises(AgentError, match=r"--app-key is required.*--allow-unsigned-apps"):
        check_app_key(_settings(tmp_path))
    certs.create_material(tmp_path, app_signing=True)
    pub = tmp_path / certs.APP_SIGNING_PUB
    with pytest.raises(AgentError, match="exclude each other"):
        check_app_key(_settings(tmp_path, app_key=pub, allow_unsigned_apps=True))
    with pytest.raises(AppSignatureError, match="not a PEM public key"):
        check_app_key(_settings(tmp_path, app_key=tmp_path / certs.APP_SIGNING_KEY))
    check_app_key(_settings(tmp_path, app_key=pub))
    check_app_key(_settings(tmp_path, allow_unsigned_apps=True))


def test_the_supernode_finds_the_gate_first_on_its_path(tmp_path):
    certs.create_material(tmp_path, app_signing=True)
    pinned = _settings(tmp_path, app_key=tmp_path / certs.APP_SIGNING_PUB)
    found = shutil.which("flwr-clientapp", path=supernode_env(pinned, tmp_path / "h")["PATH"])
    assert found == str((tmp_path / "s" / GATE_DIR / "flwr-clientapp").resolve())
    plain = supernode_env(_settings(tmp_path, allow_unsigned_apps=True), tmp_path / "h")
    assert GATE_DIR not in plain["PATH"]  # the explicit opt-out runs Flower's own


AGENT = """
import subprocess, sys, time
from silotune.deploy.agent import _die_with_parent
import os
child = subprocess.Popen(["sleep", "600"], start_new_session=True,
                         preexec_fn=_die_with_parent(os.getpid()))
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_child_dies_with_its_sigkilled_parent():
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE,
                             text=True, env={**os.environ,
                                             "PYTHONPATH": os.pathsep.join(sys.path)})
    assert agent.stdout is not None
    child = int(agent.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    agent.send_signal(signal.SIGKILL)
    agent.wait(30)
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"child {child} outlived its SIGKILLed parent"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for init's reaping counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"

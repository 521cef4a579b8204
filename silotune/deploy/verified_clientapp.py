"""The ClientApp process of a silo that runs only the consortium's signed app.

A SuperNode runs each task of a run as a process of its own: its SuperExec starts
``flwr-clientapp --runtime-api-address ADDR --token T`` (or ``flwr-agentapp``, ...), found
on PATH (flwr/supercore/superexec/executor/subprocess_executor.py). `silotune agent`
puts a gate folder first on the SuperNode's PATH (`write_gate`):

- its ``flwr-clientapp`` runs this module (`main`), which is Flower's own entry point
  (``flwr.supernode.cli.flwr_clientapp``) with one function replaced: ``install_from_fab``
  as ``flwr/supernode/runtime/run_clientapp.py`` calls it, the step that turns the pulled
  FAB into files on disk, from which Flower then imports the ClientApp. The replacement
  first checks the FAB's signature against the pinned key (deploy/app_signing.py);
  only a FAB that passes is installed and imported. A refused one is logged as
  ``[silotune] REFUSED app ...`` and raises: Flower's run_clientapp sends that error as
  the task's reply to the coordinator and exits, having written and imported nothing;
- every other task command Flower could start on a SuperNode (``flwr-agentapp``,
  ``flwr-model``, ``flwr-connector``, ...) refuses at once: silotune has no such apps,
  and they would load a FAB outside this check.

Why this hook: Flower 1.42 offers no supported way to verify a locally submitted app on
the SuperNode (``--trusted-entities`` needs verifications that the SuperLink attaches
only to Flower Hub apps; docs/flower.md §8), and replacing one module attribute in a
process of our own leaves Flower's task handling, reply and exit paths untouched.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from silotune.deploy import app_signing

MODULE = "silotune.deploy.verified_clientapp"  # this file (`__name__` is __main__ in -m)
CLIENTAPP = "flwr-clientapp"
REFUSED = "[silotune] REFUSED app"


def write_gate(folder: Path, app_key: Path, python: str = sys.executable) -> Path:
    """Write the gate folder for a SuperNode's PATH: `CLIENTAPP` verifies with the public
    key at `app_key`; every other Flower task command refuses. Returns `folder`."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values()) | {CLIENTAPP}):
        if command == CLIENTAPP:  # -P: the working directory is never on sys.path
            body = (f"exec {shlex.quote(python)} -P -m {MODULE} --app-key "
                    f"{shlex.quote(str(app_key.resolve()))} \"$@\"")
        else:
            why = f"{REFUSED}: a {command} task; this silo runs only the signed ClientApp"
            body = f"echo {shlex.quote(why)} >&2\nexit 1"
        script = folder / command
        script.write_text(f"#!/bin/sh\n# written by `silotune agent`\n{body}\n")
        script.chmod(0o700)
    return folder


def verified_install(install: Callable[..., Path], key: Ed25519PublicKey,
                     ) -> Callable[..., Path]:
    """`install` (Flower's ``install_from_fab``) behind the signature check with `key`."""
    pinned = app_signing.key_id(key)

    def install_if_signed(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
        from flwr.supercore import log

        content = fab_file.read_bytes() if isinstance(fab_file, Path) else fab_file
        try:
            covered = app_signing.verify_fab(content, key)
        except app_signing.AppSignatureError as err:
            log(logging.ERROR, "%s (FAB %s): %s. Nothing of it was installed or "
                "imported; this silo runs only apps signed with the consortium's key %s "
                "(silotune agent --app-key).", REFUSED, _short_hash(content), err, pinned)
            raise
        log(logging.INFO, "[silotune] app %s verified: %d files signed with key %s",
            _short_hash(content), covered, pinned)
        installed = install(fab_file, *args, **kwargs)
        _forget_own_package()
        return installed

    return install_if_signed


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m silotune.deploy.verified_clientapp --app-key FILE FLOWER_ARGS...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--app-key":
        sys.exit(f"usage: python -m {MODULE} --app-key app-signing.pub "
                 f"[{CLIENTAPP} arguments]")
    key = app_signing.load_public_key(Path(args[1]))
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.install_from_fab = verified_install(run_clientapp.install_from_fab, key)
    sys.argv = [CLIENTAPP, *args[2:]]
    flwr_clientapp()


def _forget_own_package() -> None:
    """Drop this process's silotune modules once the app is verified, so that Flower
    imports the app's code from the verified FAB (its folder comes first on sys.path),
    exactly as in Flower's own ``flwr-clientapp``, which imports nothing of silotune."""
    package = MODULE.split(".")[0]
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


def _short_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:12]


if __name__ == "__main__":
    main()

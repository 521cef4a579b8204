"""The consortium's app signature: which Flower App a silo agrees to run.

Flower 1.42 verifies apps only when the SuperLink attaches verifications to them, which
it does for Flower Hub apps alone: a locally submitted FAB (``flwr run APP``) arrives
with none, so a SuperNode started with ``--trusted-entities`` refuses every app
(docs/flower.md §8). silotune therefore carries its signature *inside* the FAB and
checks it on the silo, before anything of the app is installed or imported:

- the operator holds an Ed25519 key pair (``silotune certs --app-signing``): the private
  half signs, each silo pins the public half (``silotune agent --app-key``);
- ``silotune run`` adds `SIGNATURE_FILE` to the app it submits: the SHA-256 of every
  other file of the FAB, signed (`sign_files`);
- the agent's ClientApp process (``verified_clientapp``) calls `verify_fab` on the FAB
  it pulled: the signature must verify with the pinned key and list *exactly* the FAB's
  files (none missing, none extra, none changed), else the app is refused.

Only Flower's own manifest ``.info/CONTENT`` is left out: Flower checks it and deletes
it before installing, so it never becomes part of the app. Pure: no Flower imports,
only ``zipfile`` and ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SIGNATURE_FILE = "silotune-signature.json"  # in the app's root, so `flwr build` keeps it
FORMAT = "silotune-app-signature/1"
FLOWER_CONTENT = ".info/CONTENT"  # Flower's own file list, removed before installation
MAX_SIGNATURE_BYTES = 4 << 20  # read no more than this of an untrusted signature file


class AppSignatureError(ValueError):
    """A key cannot be used, or an app is not signed by the pinned key; says which."""


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key for logs and signatures: the first 16 hex
    digits of the SHA-256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh key pair as (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The operator's app-signing key (``app-signing.key``)."""
    data = _read_key(path, "app-signing private key", "app-signing.key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise AppSignatureError(f"app-signing private key {path} is not an unencrypted PEM "
                                f"private key ({err}); pass the app-signing.key made by "
                                "`silotune certs --app-signing`") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise AppSignatureError(f"{path} is not an Ed25519 key; pass the app-signing.key "
                                "made by `silotune certs --app-signing`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The consortium's app-signing public key a silo pins (``app-signing.pub``)."""
    data = _read_key(path, "app-signing public key", "app-signing.pub")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise AppSignatureError(f"app-signing public key {path} is not a PEM public key "
                                f"({err}); pass the consortium's app-signing.pub") from err
    if not isinstance(key, Ed25519PublicKey):
        raise AppSignatureError(f"{path} is not an Ed25519 public key; pass the "
                                "consortium's app-signing.pub")
    return key


def sign_files(files: Mapping[str, bytes], key: Ed25519PrivateKey) -> bytes:
    """The content of `SIGNATURE_FILE` for an app made of `files` (FAB path -> bytes)."""
    payload = _payload({path: hashlib.sha256(data).hexdigest()
                        for path, data in files.items()}, key_id(key.public_key()))
    signed = {**payload, "signature": base64.b64encode(key.sign(_canonical(payload))).decode()}
    return (json.dumps(signed, indent=1, sort_keys=True) + "\n").encode()


def fab_files(fab: bytes) -> dict[str, bytes]:
    """The files a FAB installs (every entry but `FLOWER_CONTENT`), path -> bytes."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {name: archive.read(name) for name in archive.namelist()
                if name != FLOWER_CONTENT}


def verify_fab(fab: bytes, key: Ed25519PublicKey) -> int:
    """Check that `fab` is an app signed with `key`, covering exactly its files; returns
    the number of files covered. Reads the archive's directory, then the signature, and
    only then the files; nothing is extracted.

    Raises
    ------
    AppSignatureError
        The FAB is no zip archive, has no signature, is signed by another key, or holds a
        file the signature does not list (or with other content), or lacks one it lists.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as err:
        raise AppSignatureError(f"the app is not a zip archive (FAB): {err}") from err
    with archive:
        names = archive.namelist()
        if len(names) != len(set(names)):
            raise AppSignatureError("the app lists a file twice; a FAB never does")
        if SIGNATURE_FILE not in names:
            raise AppSignatureError(f"the app carries no {SIGNATURE_FILE}: it was not "
                                    "submitted with `silotune run --app-key`")
        info = archive.getinfo(SIGNATURE_FILE)
        if info.file_size > MAX_SIGNATURE_BYTES:
            raise AppSignatureError(f"{SIGNATURE_FILE} is {info.file_size} bytes, more "
                                    f"than a signature can be ({MAX_SIGNATURE_BYTES})")
        listed = _verified_listing(archive.read(SIGNATURE_FILE), key)
        present = set(names) - {SIGNATURE_FILE, FLOWER_CONTENT}
        if extra := sorted(present - set(listed)):
            raise AppSignatureError(f"the app holds {len(extra)} file(s) its signature "
                                    f"does not cover, e.g. {extra[0]!r}")
        if missing := sorted(set(listed) - present):
            raise AppSignatureError(f"the app lacks {len(missing)} signed file(s), e.g. "
                                    f"{missing[0]!r}")
        for name in sorted(present):
            if _streamed_sha256(archive, name) != listed[name]:
                raise AppSignatureError(f"{name!r} was changed after the app was signed")
    return len(listed)


def _streamed_sha256(archive: zipfile.ZipFile, name: str) -> str:
    """SHA-256 of one entry, read in chunks: a forged entry cannot fill memory."""
    digest = hashlib.sha256()
    with archive.open(name) as entry:
        while chunk := entry.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_listing(data: bytes, key: Ed25519PublicKey) -> dict[str, str]:
    """The signed path -> SHA-256 listing of a signature file, once it verifies."""
    try:
        signed = json.loads(data)
        files, signer = signed["files"], signed["key_id"]
        signature = base64.b64decode(signed["signature"], validate=True)
        well_formed = (signed["format"] == FORMAT and isinstance(signer, str)
                       and isinstance(files, dict)
                       and all(isinstance(p, str) and isinstance(h, str)
                               for p, h in files.items()))
    except (ValueError, TypeError, KeyError, binascii.Error) as err:
        raise AppSignatureError(f"{SIGNATURE_FILE} is malformed ({type(err).__name__}: "
                                f"{err})") from err
    if not well_formed:
        raise AppSignatureError(f"{SIGNATURE_FILE} is not a {FORMAT} signature")
    if signer != key_id(key):
        raise AppSignatureError(f"the app is signed with key {signer}, but this silo pins "
                                f"key {key_id(key)} (--app-key): only the consortium's "
                                "app-signing key may sign the apps it runs")
    try:
        key.verify(signature, _canonical(_payload(files, signer)))
    except InvalidSignature as err:
        raise AppSignatureError(f"the signature in {SIGNATURE_FILE} does not verify with "
                                f"the pinned key {signer}: the listing was altered or "
                                "signed by another key") from err
    return dict(files)


def _payload(files: Mapping[str, str], signer: str) -> dict[str, Any]:
    return {"format": FORMAT, "key_id": signer, "files": dict(files)}


def _canonical(payload: Mapping[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no whitespace, so that signer and silo agree."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def _read_key(path: Path, what: str, name: str) -> bytes:
    if not path.is_file():
        raise AppSignatureError(f"{what} {path} does not exist; the consortium's operator "
                                f"makes {name} with `silotune certs --app-signing`")
    return path.read_bytes()

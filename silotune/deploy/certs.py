"""TLS and node-authentication material for a deployment (`silotune certs`).

Creates, with `cryptography`:

- a private CA (``ca.crt``, ``ca.key``) that the silos trust for the coordinator;
- the coordinator's TLS certificate (``coordinator.crt``, ``coordinator.key``), signed by
  the CA, whose subject alternative names are the host names / IP addresses the silos
  dial (a silo checks the name it connects to against them);
- one node key pair per silo (``silos/<id>/node.key``, ``node.pub``): a NIST P-384 EC key
  in OpenSSH format, which is what Flower's SuperNode authentication expects
  (``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``);
- the consortium's app-signing key pair (``app-signing.key``, ``app-signing.pub``,
  Ed25519; deploy/app_signing.py): the operator signs the app it submits with the
  private half (``silotune run --app-key``), each silo pins the public half (``silotune
  agent --app-key``) and runs no other app. Make it on the operator's own machine
  (``--app-signing`` alone), not next to the coordinator's key: whoever holds it decides
  what code runs next to every silo's data.

Private keys are written with mode 0600 in folders of mode 0700. An existing file is
never overwritten: it is kept and reported as such (delete it yourself to replace it).
In production, create each silo's key pair on the silo (``silotune certs --silo ID
--out DIR`` there) and send only ``node.pub`` to the coordinator's operator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from silotune.deploy.app_signing import new_key_pair

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "coordinator.crt"
SERVER_KEY = "coordinator.key"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
APP_SIGNING_KEY = "app-signing.key"
APP_SIGNING_PUB = "app-signing.pub"
VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for a leaf


class CertsError(ValueError):
    """Key material is missing, unreadable or inconsistent."""


@dataclass
class CertsReport:
    """What `create_material` wrote and what it kept."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        return ([f"wrote {p}" for p in self.written]
                + [f"kept  {p} (exists; delete it to create a new one)" for p in self.kept])


def silo_dir(out: Path, silo_id: str) -> Path:
    """Folder of silo `silo_id`'s node key pair under the material folder `out`."""
    return out / "silos" / silo_id


def create_material(out: Path, hosts: Sequence[str] = (), silos: Sequence[str] = (),
                    app_signing: bool = False) -> CertsReport:
    """Create the CA and coordinator certificate (when `hosts` are given), one node key
    pair per silo id in `silos` and the app-signing key pair (when `app_signing`), under
    `out`; existing files are kept.

    Raises
    ------
    CertsError
        A silo id is not a simple name, or the CA key needed to sign a new coordinator
        certificate is missing while the CA certificate exists.
    """
    report = CertsReport()
    _private_dir(out)
    if hosts:
        ca_key = _ensure_ca(out, report)
        _ensure_server_cert(out, hosts, ca_key, report)
    if app_signing:
        _ensure_app_signing(out, report)
    for silo in silos:
        if not silo or not all(c.isalnum() or c in "-_." for c in silo) or silo[0] == ".":
            raise CertsError(f"silo id {silo!r} must be a simple name (letters, digits, "
                             "'-', '_', '.')")
        folder = silo_dir(out, silo)
        _private_dir(folder)
        key_path, pub_path = folder / NODE_KEY, folder / NODE_PUB
        if key_path.exists():
            report.kept.append(key_path)
            key = load_node_key(key_path)
        else:
            key = ec.generate_private_key(ec.SECP384R1())
            _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), 0o600, report)
        if pub_path.exists():
            report.kept.append(pub_path)
        else:
            pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH)
            _write(pub_path, pub + f" silotune-{silo}\n".encode(), 0o644, report)
    return report


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A silo's node private key; `CertsError` says what is wrong and how to fix it."""
    if not path.is_file():
        raise CertsError(f"node private key {path} does not exist; create it with "
                         "`silotune certs --silo ID --out DIR` and register its node.pub "
                         "with the coordinator")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        raise CertsError(f"node private key {path} is not an unencrypted OpenSSH private "
                         f"key ({err}); create one with `silotune certs --silo ID`") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"node private key {path} is not an EC (NIST curve) key, which "
                         "Flower's node authentication requires; create one with "
                         "`silotune certs --silo ID`")
    return key


def load_ca(path: Path) -> x509.Certificate:
    """The CA certificate at `path`; `CertsError` if it is missing or not a PEM cert."""
    if not path.is_file():
        raise CertsError(f"CA certificate {path} does not exist; copy the consortium's "
                         f"{CA_CERT} (made by `silotune certs --host ...`) to this machine")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertsError(f"CA certificate {path} is not a PEM X.509 certificate") from err


def _ensure_ca(out: Path, report: CertsReport) -> ec.EllipticCurvePrivateKey:
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists():
        report.kept.append(cert_path)
        if not key_path.exists():
            raise CertsError(f"{cert_path} exists but its key {key_path} does not; a new "
                             "coordinator certificate cannot be signed. Restore the key or "
                             "start from an empty folder")
        report.kept.append(key_path)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertsError(f"{key_path} is not an EC private key")
        return key
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "silotune consortium CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write(key_path, _pem_key(key), 0o600, report)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, report)
    return key


def _ensure_server_cert(out: Path, hosts: Sequence[str], ca_key: ec.EllipticCurvePrivateKey,
                        report: CertsReport) -> None:
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    if cert_path.exists() or key_path.exists():
        report.kept += [p for p in (cert_path, key_path) if p.exists()]
        return
    ca = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(key_path, _pem_key(key), 0o600, report)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, report)


def _ensure_app_signing(out: Path, report: CertsReport) -> None:
    key_path, pub_path = out / APP_SIGNING_KEY, out / APP_SIGNING_PUB
    if key_path.exists() or pub_path.exists():  # one half alone: never a mismatched pair
        report.kept += [p for p in (key_path, pub_path) if p.exists()]
        return
    private, public = new_key_pair()
    _write(key_path, private, 0o600, report)
    _write(pub_path, public, 0o644, report)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: bytes, mode: int, report: CertsReport) -> None:
    """Create `path` with `mode` from the start (never world-readable, never replaced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    report.written.append(path)

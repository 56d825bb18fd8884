"""TLS and SuperNode-authentication credentials for a deployment.

:func:`make_credentials` writes a CA, a server certificate for the SuperLink and one SuperNode
authentication key pair per SuperNode (``python -m fedwa.deploy credentials``);
:meth:`Credentials.load` finds those files again. ``cryptography`` is imported only when keys
are made.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedwa.deploy.processes import DeployError

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Credentials:
    """Paths of the files written by :func:`make_credentials`.

    Attributes
    ----------
    directory : Path
        The folder holding every file.
    ca_cert, ca_key : Path
        The self-signed CA certificate (PEM) and its private key (PEM, mode 0600).
    server_cert, server_key : Path
        The SuperLink's certificate, signed by the CA, and its private key (mode 0600).
    supernode_keys : tuple of (Path, Path)
        Per SuperNode: the private key (OpenSSH format, mode 0600) given to
        ``flower-supernode --auth-supernode-private-key`` and the public key (OpenSSH
        ``ecdsa-sha2-nistp384 ...`` line) given to ``flwr supernode register``.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: tuple[tuple[Path, Path], ...]

    @classmethod
    def load(cls, directory: str | Path) -> Credentials:
        """Find the files of :func:`make_credentials` in ``directory``."""
        d = Path(directory).resolve()
        keys = []
        i = 0
        while (d / f"supernode-{i}.key").exists():
            keys.append((d / f"supernode-{i}.key", d / f"supernode-{i}.pub"))
            i += 1
        creds = cls(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key",
                    tuple(keys))
        missing = [p for p in (creds.ca_cert, creds.server_cert, creds.server_key)
                   if not p.exists()]
        if missing:
            raise DeployError(f"credentials folder {d} lacks {missing[0].name}; "
                              "create it with `python -m fedwa.deploy credentials DIR`")
        return creds


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start, so the key is never world-readable."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # umask cannot widen it, but an odd umask could narrow it oddly


def _san_entries(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    entries: list[Any] = []
    for host in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def make_credentials(out_dir: str | Path, num_supernodes: int,
                     hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 365) -> Credentials:
    """Write a CA, a SuperLink server certificate and SuperNode authentication key pairs.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write into (created, mode 0700). Existing files of the same names are
        replaced.
    num_supernodes : int
        Number of SuperNode key pairs (``supernode-<i>.key`` / ``supernode-<i>.pub``).
    hosts : sequence of str
        Names and IP addresses the SuperLink is reached at; they become the server
        certificate's subject alternative names. 127.0.0.1 and localhost are always added,
        because SuperExec processes reach the SuperLink's and SuperNodes' Runtime API there.
    days : int
        Validity of the certificates.

    Returns
    -------
    Credentials
        The paths written.

    Notes
    -----
    Flower 1.41's SuperNode authentication uses elliptic-curve keys on a NIST curve
    (``flwr supernode register`` loads an OpenSSH public key and rejects other curves;
    ``flower-supernode`` loads an OpenSSH private key). We use P-384, the curve Flower's
    documentation names. TLS keys are P-256 ECDSA, which every TLS stack accepts.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if num_supernodes < 0:
        raise ValueError("num_supernodes must be >= 0")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)
    pem = serialization.Encoding.PEM

    def pkcs8(key: Any) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    # CA
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedwa deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # Server certificate for the SuperLink (and the SuperNodes' Runtime API)
    all_hosts = list(DEFAULT_HOSTS) + [h for h in hosts if h not in DEFAULT_HOSTS]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_san_entries(all_hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _write_private(out / "ca.key", pkcs8(ca_key))
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    _write_private(out / "server.key", pkcs8(server_key))
    (out / "server.pem").write_bytes(server_cert.public_bytes(pem))

    keys = []
    for i in range(num_supernodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"supernode-{i}.key", out / f"supernode-{i}.pub"
        _write_private(priv, node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
        pub.write_bytes(node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        keys.append((priv, pub))
    # Drop key pairs left over from an earlier, larger call: Credentials.load counts them.
    i = num_supernodes
    while (out / f"supernode-{i}.key").exists():
        (out / f"supernode-{i}.key").unlink()
        with contextlib.suppress(FileNotFoundError):
            (out / f"supernode-{i}.pub").unlink()
        i += 1
    return Credentials(out, out / "ca.pem", out / "ca.key", out / "server.pem",
                       out / "server.key", tuple(keys))

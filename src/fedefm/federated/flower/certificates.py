"""Self-signed TLS certificates and SuperNode keys for a test federation (production uses a real CA).

``write_test_certificates`` makes a CA and a SuperLink certificate signed by it for the given host
names and addresses; SuperNodes and ``flwr`` trust the CA file. ``write_node_key`` makes the EC
P-384 key pair (OpenSSH format) a SuperNode signs its requests with when the SuperLink runs with
``--enable-supernode-auth``; the public half is registered with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedefm.files import atomic_write


def _write(path: Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_test_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                            days: int = 30) -> tuple[Path, Path, Path]:
    """Write ca.crt, server.pem and server.key into ``folder``; returns their paths (CA, certificate, key).

    The server certificate names every entry of ``hosts`` (IP addresses and DNS names) as a subject
    alternative name, which TLS clients check against the address they dial.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (x509.CertificateBuilder().subject_name(_name("fedefm test CA")).issuer_name(_name("fedefm test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_format = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                      encryption_algorithm=serialization.NoEncryption())
    return (_write(folder / "ca.crt", ca.public_bytes(pem)),
            _write(folder / "server.pem", cert.public_bytes(pem)),
            _write(folder / "server.key", key.private_bytes(**key_format)))


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """Write NAME (private) and NAME.pub (public), an EC P-384 pair in OpenSSH format; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(folder / name, private), _write(folder / f"{name}.pub", public + b"\n")

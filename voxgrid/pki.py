"""The federation's certificate authority: create it, issue node certificates, make TLS contexts.

Security invariant 4 says every request travels over TLS, the demo included. A federation has
one private CA (EC P-256, path length 0: it signs leaf certificates only). Nodes and the grid
serve with certificates it issued; clients trust that CA alone, never the system store, so a
publicly valid certificate for the same host name cannot impersonate a node.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertPaths",
    "create_ca",
    "issue_certificate",
    "load_ca",
    "server_ssl_kwargs",
    "client_ssl_context",
    "certificate_info",
    "CertificateError",
    "verify_certificate",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# RFC 1123 labels (plus "_", common in container host names); one leading "*." wildcard.
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# Tolerate clocks a few minutes apart between the CA's host and the nodes.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    """Where a certificate (PEM) and its private key (PEM, mode 0600) live."""

    cert: Path
    key: Path


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 from the start (no window where the key is world-readable), and chmod-ed in
    # case the file already existed with looser bits.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(
    out_dir: str | os.PathLike,
    common_name: str = "voxgrid federation CA",
    days: int = 3650,
    *,
    overwrite: bool = False,
) -> CertPaths:
    """Create the federation CA as ``out_dir/ca.crt`` and ``out_dir/ca.key``.

    Refuses to replace an existing CA unless ``overwrite``: a new CA key silently invalidates
    every certificate the old one issued.
    """
    out = Path(out_dir)
    paths = CertPaths(out / "ca.crt", out / "ca.key")
    if not overwrite and (paths.cert.exists() or paths.key.exists()):
        raise FileExistsError(f"a CA already exists in {out}; use load_ca() or overwrite=True")
    if days < 1:
        raise ValueError(f"days must be >= 1, not {days}")
    out.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private_key(paths.key, key)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.split(".")
        if labels[0] == "*" and len(labels) > 2:
            labels = labels[1:]
        if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"host {host!r} is neither an IP address nor a valid DNS name")
        entries.append(x509.DNSName(host))
    return entries


def issue_certificate(
    ca: CertPaths,
    out_dir: str | os.PathLike,
    name: str,
    hosts: list[str],
    days: int = 825,
    client: bool = False,
) -> CertPaths:
    """Issue ``out_dir/<name>.crt`` and ``<name>.key`` for ``hosts``, signed by ``ca``.

    Hosts become SubjectAlternativeNames (IP literals as IPAddress, others as DNSName); the
    certificate serves TLS, and with ``client=True`` may also authenticate as a TLS client.
    Validity is capped at the CA's own expiry.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"certificate name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if isinstance(hosts, str) or not hosts:
        raise ValueError(f"hosts for {name!r} must be a non-empty list of DNS names or IP addresses")
    if days < 1:
        raise ValueError(f"days must be >= 1, not {days}")
    sans = _san_entries(list(hosts))

    ca_cert = x509.load_pem_x509_certificate(Path(ca.cert).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca.key).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca_cert.public_key():
        raise ValueError(f"{ca.key} is not the private key of {ca.cert}")

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(out / f"{name}.crt", out / f"{name}.key")
    _write_private_key(paths.key, key)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def load_ca(ca_dir: str | os.PathLike) -> CertPaths:
    """The CA created by :func:`create_ca` in ``ca_dir``; FileNotFoundError names a missing file."""
    paths = CertPaths(Path(ca_dir) / "ca.crt", Path(ca_dir) / "ca.key")
    for path in (paths.cert, paths.key):
        if not path.is_file():
            raise FileNotFoundError(f"CA file {path} not found; create the CA with create_ca({str(ca_dir)!r})")
    return paths


def server_ssl_kwargs(cert: CertPaths) -> dict[str, str]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` to serve HTTPS with ``cert``."""
    return {"ssl_certfile": str(cert.cert), "ssl_keyfile": str(cert.key)}


def client_ssl_context(ca_cert_path: str | os.PathLike, client_cert: CertPaths | None = None) -> ssl.SSLContext:
    """A TLS >= 1.2 client context that trusts only the federation CA and checks host names.

    Pass it to httpx as ``verify=``. ``client_cert`` adds a certificate for mutual TLS.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert_path))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if client_cert is not None:
        context.load_cert_chain(str(client_cert.cert), str(client_cert.key))
    return context


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def certificate_info(cert_path: str | os.PathLike) -> dict:
    """A JSON-ready summary of a certificate: names, validity, fingerprint."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        sans = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "subject_cn": _common_name(cert.subject),
        "issuer_cn": _common_name(cert.issuer),
        "sans": sans,
        "not_valid_before": cert.not_valid_before_utc.isoformat(),
        "not_valid_after": cert.not_valid_after_utc.isoformat(),
        "serial": format(cert.serial_number, "x"),
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "is_ca": is_ca,
    }


class CertificateError(ValueError):
    """A certificate or key that does not fit: foreign CA, expired, wrong key or wrong name."""


def verify_certificate(cert_path: str | os.PathLike, ca_cert_path: str | os.PathLike, *,
                       key_path: str | os.PathLike | None = None, name: str | None = None,
                       now: dt.datetime | None = None) -> x509.Certificate:
    """Check that ``cert_path`` is a leaf certificate the federation CA issued, valid now, whose
    common name is ``name`` and whose private key is ``key_path``; return it, or raise
    :class:`CertificateError` saying which check failed."""
    from cryptography.exceptions import InvalidSignature

    now = now or _now()
    try:
        ca = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{ca_cert_path} is not a PEM certificate: {exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{cert_path} is not a PEM certificate: {exc}") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"{cert_path} (issuer {cert.issuer.rfc4514_string()!r}) was not issued by the "
                               f"federation CA {ca.subject.rfc4514_string()!r}") from None
    if now < cert.not_valid_before_utc or now >= cert.not_valid_after_utc:
        raise CertificateError(f"{cert_path} is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z to "
                               f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, not now")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertificateError(f"{cert_path} is a CA certificate, not a server certificate")
    except x509.ExtensionNotFound:
        pass
    if name is not None and _common_name(cert.subject) != name:
        raise CertificateError(f"{cert_path} is issued to {_common_name(cert.subject)!r}, not to {name!r}")
    if key_path is not None:
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
        if key.public_key() != cert.public_key():
            raise CertificateError(f"{key_path} is not the private key of {cert_path}")
    return cert

"""A small private PKI for one broker: a CA, the server certificate, client certificates.

All keys are ECDSA P-256, written as unencrypted PKCS#8 PEM with mode 0600;
certificates are PEM. The server certificate names the broker by DNS names and
IP addresses (subject alternative names); a client certificate's CN is the
account name (the device id for devices).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import ConfigError
from broker.passwords import write_secret_file

CA_DAYS = 3650
LEAF_DAYS = 825
_SKEW = dt.timedelta(hours=1)  # tolerate device clocks running a little behind


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_key(key: ec.EllipticCurvePrivateKey, path: str | Path) -> Path:
    """Write a private key as PKCS#8 PEM, mode 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return write_secret_file(path, pem)


def write_cert(cert: x509.Certificate, path: str | Path) -> Path:
    return write_secret_file(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def load_cert(path: str | Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM certificate: {exc}") from None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hostnames: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ConfigError("a server certificate needs at least one host name or IP address")
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class CertificateAuthority:
    """The broker's CA: signs the server certificate and the client certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(
        cls,
        key_path: str | Path,
        cert_path: str | Path,
        *,
        name: str = "fedmq CA",
        days: int = CA_DAYS,
    ) -> CertificateAuthority:
        """Make a key and a self-signed CA certificate and write both."""
        key = new_key()
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
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
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_key(key, key_path)
        write_cert(cert, cert_path)
        return cls(key, cert)

    @classmethod
    def load(cls, key_path: str | Path, cert_path: str | Path) -> CertificateAuthority:
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{key_path}: not a readable CA key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path}: the CA key is not an ECDSA key")
        return cls(key, load_cert(cert_path))

    def _issue(
        self,
        common_name: str,
        extensions: list[tuple[x509.ExtensionType, bool]],
        key_path: str | Path,
        cert_path: str | Path,
        days: int,
    ) -> x509.Certificate:
        key = new_key()
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        cert = builder.sign(self.key, hashes.SHA256())
        write_key(key, key_path)
        write_cert(cert, cert_path)
        return cert

    def issue_server(
        self,
        key_path: str | Path,
        cert_path: str | Path,
        hostnames: Iterable[str] = ("localhost", "127.0.0.1"),
        *,
        days: int = LEAF_DAYS,
    ) -> x509.Certificate:
        """A server certificate valid for every name/IP in ``hostnames``; CN = the first one."""
        hostnames = list(hostnames)
        san = _san(hostnames)
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        return self._issue(hostnames[0], [(san, False), (eku, False)], key_path, cert_path, days)

    def issue_client(
        self,
        common_name: str,
        key_path: str | Path,
        cert_path: str | Path,
        *,
        days: int = LEAF_DAYS,
    ) -> x509.Certificate:
        """A client certificate whose CN is ``common_name`` (the account name)."""
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(common_name, [(eku, False)], key_path, cert_path, days)

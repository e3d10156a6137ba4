"""A throwaway certificate authority for tests and benchmarks of the broker's TLS (README,
"Securing the broker"): a CA, a server certificate for the loopback broker, and client certificates
whose CN is the identity the broker's ACL knows a client by.

Made with the ``cryptography`` package (the agent needs it for signed commands), in memory and
written as PEM files; a site makes its own with openssl as the README shows. Keys are EC P-256: a
fraction of an RSA key's generation time, so a test can make a whole PKI in well under a second.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertPair", "CertificateAuthority"]


@dataclass(frozen=True)
class CertPair:
    """A certificate and its key, as PEM files."""

    cert_file: str
    key_file: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


class CertificateAuthority:
    """A CA in ``directory`` (``ca.crt``, ``ca.key``) that issues server and client certificates there."""

    def __init__(self, directory: str | Path, name: str = "edge-agent test CA", *, days: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self._name = _name(name)
        self._cert = (
            x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = str(self.directory / "ca.crt")
        Path(self.ca_file).write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.directory / "ca.key", self._key)

    def _issue(self, common_name: str, file_stem: str, *, server: bool,
               hosts: tuple[str, ...] = ()) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self._name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pair = CertPair(str(self.directory / f"{file_stem}.crt"), str(self.directory / f"{file_stem}.key"))
        Path(pair.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(Path(pair.key_file), key)
        return pair

    def server(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), name: str = "server") -> CertPair:
        """A broker certificate valid for ``hosts`` (IP addresses and DNS names, in its SAN)."""
        return self._issue(hosts[0], name, server=True, hosts=hosts)

    def client(self, identity: str) -> CertPair:
        """A client certificate whose CN is ``identity`` (a board's device id, an application's or an
        operator's name): with ``use_identity_as_username true`` the broker's ACL sees it as the username."""
        if not identity or any(c in identity for c in "/+#"):
            raise ValueError(f"identity = {identity!r}: expected a non-empty name without '/', '+' or '#' "
                             "(the broker's ACL patterns put it in topics)")
        return self._issue(identity, f"client-{identity}", server=False)

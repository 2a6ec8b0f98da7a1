"""TLS for the tcp transport: the certificates a side presents and trusts, and the ``ssl`` contexts made
from them; and :func:`make_cluster_material`, a private certificate authority for one cluster in one call.

TLS is an option of ``tcp://``, not a scheme of its own. A server presents a certificate; given a CA it
also requires a certificate signed by that CA from every client and worker (mutual TLS). A client or
worker verifies the server against its CA (or the system's trusted CAs) and the host name or IP address
it connects to, and presents its own certificate when it has one. TLS 1.2 is the oldest version spoken.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import TransportError

if TYPE_CHECKING:  # imported where used: a plaintext client or worker never pays for ssl
    import argparse
    import ssl
    from pathlib import Path

__all__ = ["OPTION_NAMES", "TlsConfig", "TlsError", "TlsMaterial", "make_cluster_material"]

# The keyword arguments (``RemoteExecutor(tls_ca=...)``) and settings (``ServerSettings.extra``) of TLS.
OPTION_NAMES = ("tls", "tls_ca", "tls_cert", "tls_key")
CRYPTO_HINT = "pip install 'remote-executor[crypto]'"


class TlsError(TransportError):
    """TLS cannot work as configured: a certificate that does not verify, or that the peer refused, or a
    certificate or key file that cannot be loaded. Not transient: reconnecting would fail the same way."""


@dataclass(frozen=True)
class TlsConfig:
    """The certificate files of one side. ``ca``: whom to trust (a client: the server's CA, None for the
    system's CAs; a server: the CA of client certificates, which are then required). ``cert``/``key``:
    what this side presents (required for a server; a client's for mutual TLS). ``key`` may be omitted
    when ``cert`` holds the key too."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if self.key is not None and self.cert is None:
            raise TlsError("a TLS key without a certificate: give tls_cert too")

    # --- where a configuration comes from ----------------------------------------------------------------

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TlsConfig | None:
        """From ``tls_ca``/``tls_cert``/``tls_key`` (file paths) or ``tls`` (True: verify the server
        against the system's CAs; or a TlsConfig) among transport options; None if TLS is off."""
        unknown = sorted(k for k in options if k.startswith("tls") and k not in OPTION_NAMES)
        if unknown:
            raise TransportError(f"unknown TLS option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
        flag = options.get("tls")
        files = {name: options.get(f"tls_{name}") for name in ("ca", "cert", "key")}
        if isinstance(flag, TlsConfig):
            if any(files.values()):
                raise TransportError("pass tls=TlsConfig(...) or tls_ca/tls_cert/tls_key, not both")
            return flag
        if flag not in (None, True, False):
            raise TransportError(f"tls must be True, False or a TlsConfig, not {flag!r}")
        if flag is False and any(files.values()):
            raise TransportError("tls=False contradicts the tls_ca/tls_cert/tls_key given")
        if not flag and not any(files.values()):
            return None
        return cls(**{name: value for name, value in files.items() if value})

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, server: bool = False) -> None:
        """The command-line flags of a server, or of a client or worker."""
        if server:
            parser.add_argument("--tls-cert", metavar="FILE", help="tcp only: serve TLS with this certificate (PEM)")
            parser.add_argument("--tls-key", metavar="FILE", help="tcp only: the private key of --tls-cert")
            parser.add_argument("--tls-ca", metavar="FILE",
                                help="tcp only: require client and worker certificates signed by this CA")
            return
        parser.add_argument("--tls", action="store_true",
                            help="tcp and gearman: TLS, verifying the server against the system's trusted CAs")
        parser.add_argument("--tls-ca", metavar="FILE", help="tcp and gearman: TLS, trusting the server "
                            "certificates this CA signed")
        parser.add_argument("--tls-cert", metavar="FILE", help="tcp and gearman: this side's certificate (mutual TLS)")
        parser.add_argument("--tls-key", metavar="FILE", help="tcp and gearman: the private key of --tls-cert")

    @staticmethod
    def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
        """The transport options that flags from :meth:`add_arguments` give (empty: no TLS)."""
        found: dict[str, Any] = {name: getattr(args, name, None) for name in OPTION_NAMES}
        return {name: value for name, value in found.items() if value}

    def to_args(self) -> tuple[str, ...]:
        """Flags for a child process (``python -m remote_executor.worker``), paths made absolute."""
        args: list[str] = ["--tls"]
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--tls-{name}", os.path.abspath(value)]
        return tuple(args)

    # --- contexts ----------------------------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """Presents ``cert``; with ``ca``, requires a client certificate that ``ca`` signed."""
        import ssl

        if self.cert is None:
            raise TlsError("a TLS server needs a certificate and its key (tls_cert, tls_key / --tls-cert, --tls-key)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._harden(context)
        context.num_tickets = 0  # nobody resumes sessions here: spare every new connection the tickets
        self._load_chain(context)
        if self.ca is not None:
            self._load_ca(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against ``ca`` (else the system's CAs) and the name or IP address connected
        to; presents ``cert`` when there is one."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        self._harden(context)
        if self.ca is not None:
            self._load_ca(context)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert is not None:
            self._load_chain(context)
        return context

    @staticmethod
    def _harden(context: ssl.SSLContext) -> None:
        import ssl

        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # Renegotiation is the only way a write could need a read first; without it the non-blocking
        # loops never have to wait for the other direction.
        context.options |= ssl.OP_NO_RENEGOTIATION

    def _load_chain(self, context: ssl.SSLContext) -> None:
        import ssl

        assert self.cert is not None

        def encrypted() -> str:  # else OpenSSL would ask for a passphrase on the terminal, and a worker hang
            raise TlsError(f"the TLS key {self.key or self.cert!r} is encrypted: give an unencrypted key file "
                           f"(mode 0600)")

        try:
            context.load_cert_chain(self.cert, self.key, password=encrypted)
        except (OSError, ssl.SSLError) as exc:  # a missing file, not PEM, a key that does not match
            what = f"certificate {self.cert!r}" + (f" with key {self.key!r}" if self.key else "")
            raise TlsError(f"cannot load the TLS {what}: {_reason(exc)}") from exc

    def _load_ca(self, context: ssl.SSLContext) -> None:
        import ssl

        assert self.ca is not None
        try:
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load the TLS CA certificate {self.ca!r}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    import ssl

    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)


# --- a private certificate authority ---------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """The files :func:`make_cluster_material` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server(self) -> TlsConfig:
        """The job server's side: its certificate, and client certificates required."""
        return TlsConfig(ca=str(self.ca), cert=str(self.server_cert), key=str(self.server_key))

    def client(self) -> TlsConfig:
        """A client's or worker's side: trust the cluster CA, present the client certificate."""
        return TlsConfig(ca=str(self.ca), cert=str(self.client_cert), key=str(self.client_key))


def make_cluster_material(directory: str | os.PathLike[str], hosts: Sequence[str], days: int = 825) -> TlsMaterial:
    """Write a new private CA and the certificates of one cluster into ``directory``: ``ca.pem``,
    ``server.pem``/``server.key`` (valid for each of ``hosts``, names or IP addresses) and
    ``client.pem``/``client.key`` (for every client and worker). Keys are written with mode 0600.

    The CA's own key is not kept: no one can sign another certificate for this cluster, so to add a
    server host, make new material. Existing files are never overwritten."""
    if not hosts:
        raise ValueError("give at least one host name or IP address the server is reached by")
    if days < 1:
        raise ValueError("days must be at least 1")
    import datetime
    from pathlib import Path

    x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID = _crypto()
    sans = [_san(x509, host) for host in hosts]
    out = Path(directory)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    material = TlsMaterial(out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem",
                           out / "client.key")
    existing = [str(p) for p in vars(material).values() if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)  # 1 h of clock skew

    def name(common_name: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "remote-executor cluster"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("remote-executor cluster CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(common_name: str, usage: Any, alt_names: list[Any]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        )
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = issue(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = issue("remote-executor client", ExtendedKeyUsageOID.CLIENT_AUTH,
                                    [x509.DNSName("remote-executor-client")])

    def pem(cert: Any) -> bytes:
        return bytes(cert.public_bytes(serialization.Encoding.PEM))

    def key_pem(key: Any) -> bytes:
        return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))

    _write(material.ca, pem(ca_cert), 0o644)
    _write(material.server_cert, pem(server_cert) + pem(ca_cert), 0o644)  # the chain a client verifies
    _write(material.server_key, key_pem(server_key), 0o600)
    _write(material.client_cert, pem(client_cert) + pem(ca_cert), 0o644)
    _write(material.client_key, key_pem(client_key), 0o600)
    return material


def _crypto() -> tuple[Any, Any, Any, Any, Any, Any]:
    """The parts of ``cryptography`` that certificates need, imported only now (an optional dependency)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise TlsError(f"making TLS certificates needs the cryptography package: {CRYPTO_HINT}") from exc
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _san(x509: Any, host: str) -> Any:
    """A subject alternative name for ``host``: an IP address entry for an address, else a DNS name."""
    import ipaddress

    host = host.strip().strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return x509.DNSName(host)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a key is never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have taken bits from a public file's mode

"""TLS for the gRPC server: a server certificate, optionally a client CA (mTLS), and a reload
that swaps the certificate for new connections without a restart.

`ReloadableCredentials.server_credentials()` is grpc's dynamic SSL credentials: grpc asks the
fetcher for a new certificate configuration on each handshake, and the fetcher answers one only
after `reload` validated changed files. It works with ``grpc.server`` and ``grpc.aio.server``
(``add_secure_port``). Files are checked with the `cryptography` package (imported when used).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from wara_train.errors import ConfigError

log = logging.getLogger("wara.serve")

KEYS = {"cert": "tls_cert", "key": "tls_key", "client_ca": "tls_client_ca"}  # field -> serve config key


@dataclass(frozen=True)
class TlsConfig:
    """``cert``: the server certificate chain (PEM, leaf first); ``key``: its private key
    (unencrypted PEM); ``client_ca``: CA certificates that sign client certificates (turns on
    mTLS); ``require_client_cert``: refuse a client without a certificate signed by ``client_ca``.

    grpc's Python API has no "request but do not require" mode: without a required client
    certificate it does not ask for one, so ``client_ca`` with ``require_client_cert = false``
    would silently ignore every client certificate and is refused.
    """

    cert: str
    key: str
    client_ca: str | None = None
    require_client_cert: bool = True

    def __post_init__(self) -> None:
        for field, key in KEYS.items():
            path = getattr(self, field)
            if path is None and field == "client_ca":
                continue
            if not isinstance(path, (str, os.PathLike)):
                raise ConfigError(f"{key} must be a file path, not {type(path).__name__}")
            path = os.fspath(path)
            object.__setattr__(self, field, path)
            if not os.path.isfile(path):
                raise ConfigError(f"{key}: {path!r} does not exist or is not a file")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{key}: {path!r} is not readable by this process")
        if not isinstance(self.require_client_cert, bool):
            raise ConfigError(f"tls_require_client_cert must be true or false, not {self.require_client_cert!r}")
        if self.client_ca is not None and not self.require_client_cert:
            raise ConfigError("tls_client_ca with tls_require_client_cert = false: grpc does not ask for a client "
                              "certificate unless it requires one, so every certificate would be ignored; set "
                              "tls_require_client_cert = true, or drop tls_client_ca and use bearer tokens")

    @property
    def client_auth(self) -> bool:
        """Whether a client must present a certificate signed by ``client_ca``."""
        return self.client_ca is not None and self.require_client_cert


class Material(NamedTuple):
    """The PEM bytes grpc is given, checked to parse and to belong together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(tls: TlsConfig, field: str) -> bytes:
    path = getattr(tls, field)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{KEYS[field]}: cannot read {path!r}: {e.strerror}") from None


def load_material(tls: TlsConfig) -> Material:
    """Read and check the files of ``tls``: each PEM parses, the key is unencrypted and is the
    key of the first certificate in ``cert``. Raises ConfigError naming the config key."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # pragma: no cover - the dev extra installs it
        raise ConfigError("TLS needs the 'cryptography' package: pip install 'cryptography>=42'") from None

    def certificates(field: str, data: bytes) -> list:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
        if not certs:
            raise ConfigError(f"{KEYS[field]}: {getattr(tls, field)!r} holds no PEM certificate that parses")
        return certs

    cert = _read(tls, "cert")
    leaf = certificates("cert", cert)[0]
    key = _read(tls, "key")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise ConfigError(f"tls_key: {tls.key!r} is encrypted; give the server an unencrypted key") from None
    except ValueError:
        raise ConfigError(f"tls_key: {tls.key!r} holds no PEM private key that parses") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(f"tls_key: {tls.key!r} is not the key of the certificate in tls_cert {tls.cert!r}")
    ca = None
    if tls.client_ca is not None:
        ca = _read(tls, "client_ca")
        certificates("client_ca", ca)
    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        log.warning("tls_cert %r is valid from %s to %s only; clients will refuse it now", tls.cert,
                    leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    return Material(cert, key, ca)


class ReloadableCredentials:
    """Server credentials whose certificate (and client CA) `reload` replaces for connections
    made after it; connections already open keep theirs."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._material = load_material(tls)  # ConfigError at start: nothing to fall back on
        self._generation = 0

    def _configuration(self, material: Material):
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; each call makes an independent one (one per port)."""
        with self._lock:
            material, seen = self._material, self._generation

        def fetch():  # grpc calls it before each handshake; None keeps the current configuration
            nonlocal seen
            with self._lock:
                if self._generation == seen:
                    return None
                material, seen = self._material, self._generation
            try:
                return self._configuration(material)
            except Exception:  # never let grpc see an exception from here
                log.exception("TLS reload: grpc refused the new certificate configuration; keeping the old one")
                return None

        return grpc.dynamic_ssl_server_credentials(self._configuration(material), fetch,
                                                   require_client_authentication=self.tls.client_auth)

    def reload(self) -> bool:
        """Re-read and check the files. True: they are valid and are what new connections get
        (they may be unchanged). False: a file is bad; the error is logged and the old
        certificate stays in use."""
        try:
            material = load_material(self.tls)
        except ConfigError as e:
            log.error("TLS reload failed, keeping the current certificate: %s", e)
            return False
        with self._lock:
            if material != self._material:
                self._material = material
                self._generation += 1
                log.info("TLS reload: new certificate from %r for new connections", self.tls.cert)
        return True

"""Authentication and tenancy: who is calling, and which adapters they may use.

A tenant (``[[serve.tenant]]`` in the serve TOML) authenticates with a bearer token, whose
SHA-256 hash alone is stored in the config, or with a client certificate whose subject it lists
(mTLS, `runtime.tls`). With no tenant configured, auth is off and every call is the `OPEN`
principal. The server edge calls `Authenticator.identify` with what grpc gives a handler
(``context.invocation_metadata()``, ``context.auth_context()``); before that, its interceptor
(`runtime.grpc_auth`) calls `Authenticator.screen` with the metadata alone, so that a call without
a valid credential is refused before its body is read. Refusals are logged through the
authenticator's `RefusalLog`: metadata keys only, never a value, and a bounded number of lines.
Nothing here holds grpc objects.

cryptography (only for certificate subjects) is imported when a subject is first parsed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

from wara_train.errors import ConfigError

from .errors import PermissionDenied, Unauthenticated, clip

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")
BEARER = re.compile(r"bearer +(\S+)", re.IGNORECASE)
OPEN_NAME = "-"  # the principal's name when auth is off; no configured tenant may take it



def hash_token(token: str) -> str:
    """``"sha256:" + hex(SHA-256(utf8(token)))``. Tokens are 256-bit random strings, so a plain,
    fast hash is enough (as GitHub stores its tokens); a slow KDF would only add latency."""
    if not isinstance(token, str):
        raise TypeError(f"a token is a str, not {type(token).__name__}")
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A new bearer token: ``"wara_"`` + 32 random bytes, URL-safe base64 (43 chars)."""
    return "wara_" + secrets.token_urlsafe(32)


def _show(value: object) -> str:
    """A config value for an error message: clipped if a string, else its repr."""
    return clip(value) if isinstance(value, (str, bytes)) else clip(repr(value))[1:-1]


def _hint(value: str) -> str:
    """The start of a secret-looking config value: at most 8 chars and never half of it."""
    return repr(value[: min(8, len(value) // 2)] + "...")


def _x509():
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - the dev extra installs it
        raise ConfigError("client-certificate subjects need the 'cryptography' package: "
                          "pip install 'cryptography>=42'") from None
    return x509


class Subject(NamedTuple):
    """A certificate subject: ``canonical`` RFC 4514 string (cryptography's rendering, so that
    equal names compare equal), its ``common_name`` when it has exactly one, and ``cn_only``
    when the name is nothing but ``CN=<common_name>``."""

    canonical: str
    common_name: str | None
    cn_only: bool


@functools.lru_cache(maxsize=1024)
def parse_subject(subject: str) -> Subject:
    """A distinguished name in RFC 4514 form (OpenSSL's ``-nameopt RFC2253``, grpc's
    ``x509_subject``, most significant attribute last). Raises ValueError."""
    x509 = _x509()
    name = x509.Name.from_rfc4514_string(subject)
    if not len(name):
        raise ValueError("empty subject")
    cns = [str(a.value) for a in name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    cn = cns[0] if len(cns) == 1 else None
    return Subject(name.rfc4514_string(), cn, cn is not None and len(name) == 1)


def _strings(tenant: str, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"tenant {tenant!r}: {key} must be a list of strings, "
                          f"not {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"tenant {tenant!r}: {key}[{i}] must be a non-empty string, "
                              f"not {_show(item) if isinstance(item, str) else type(item).__name__}")
    return tuple(value)


@dataclass(frozen=True)
class Tenant:
    """One ``[[serve.tenant]]`` table.

    ``adapters``: adapter names or fnmatch patterns (case-sensitive) it may use; ``admin``: may
    use every adapter and load/unload; ``tokens``: ``sha256:<hex>`` hashes of its bearer tokens
    (`wara token`); ``subjects``: client-certificate subjects in RFC 4514 form
    (``CN=acme-client,O=Acme``), or ``CN=name`` to match the common name alone;
    ``max_adapters``: loaded adapters matching its patterns (None: no per-tenant limit);
    ``max_queue``: its requests queued or running at once.
    """

    name: str
    adapters: tuple[str, ...] = ()
    admin: bool = False
    tokens: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    max_adapters: int | None = None
    max_queue: int = 64

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not (name == OPEN_NAME or NAME.fullmatch(name)):
            raise ConfigError(f"tenant name {_show(name)} must match {NAME.pattern} "
                              "(letters, digits, '.', '_', '-'; at most 64)")
        set_ = functools.partial(object.__setattr__, self)
        set_("adapters", _strings(name, "adapters", self.adapters))
        if not isinstance(self.admin, bool):
            raise ConfigError(f"tenant {name!r}: admin must be true or false, not {_show(self.admin)}")
        tokens = _strings(name, "tokens", self.tokens)
        for i, token in enumerate(tokens):
            if not TOKEN_HASH.fullmatch(token):
                raise ConfigError(
                    f"tenant {name!r}: tokens[{i}] ({_hint(token)}) is not a token hash "
                    "'sha256:<64 lowercase hex>'; the config stores hashes only: run `wara token` and store "
                    "the hash it prints (`wara token --hash` hashes an existing token read from stdin)")
        set_("tokens", tokens)
        subjects = []
        for i, subject in enumerate(_strings(name, "subjects", self.subjects)):
            try:
                subjects.append(parse_subject(subject).canonical)
            except ValueError:
                raise ConfigError(
                    f"tenant {name!r}: subjects[{i}] {clip(subject)} is not a distinguished name in RFC 4514 "
                    "form, e.g. 'CN=acme-client,O=Acme' (upper-case keys, no space after commas; "
                    "`openssl x509 -noout -subject -nameopt RFC2253 -in client.pem` prints it)") from None
        set_("subjects", tuple(subjects))
        for key, value, optional in (("max_adapters", self.max_adapters, True), ("max_queue", self.max_queue, False)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"tenant {name!r}: {key} must be a positive integer"
                                  f"{' or absent' if optional else ''}, not {_show(value)}")

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> Tenant:
        """A tenant from one ``[[serve.tenant]]`` TOML table."""
        valid = [f.name for f in fields(cls)]
        if not isinstance(table, Mapping):
            raise ConfigError(f"[[serve.tenant]] must be a table with keys {', '.join(valid)}")
        unknown = sorted(set(table) - set(valid))
        if unknown:
            raise ConfigError(f"[[serve.tenant]] {clip(table.get('name', '?'))}: unknown key(s) "
                              f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
        if "name" not in table:
            raise ConfigError("[[serve.tenant]] needs a name")
        if table["name"] == OPEN_NAME:
            raise ConfigError(f"the tenant name {OPEN_NAME!r} is reserved (the caller when auth is off)")
        return cls(**table)

    def may_use(self, adapter_name: str) -> bool:
        """Whether this tenant may call (or count as its own) the adapter ``adapter_name``."""
        return self.admin or any(fnmatch.fnmatchcase(adapter_name, p) for p in self.adapters)


OPEN = Tenant(OPEN_NAME, admin=True)


def require_admin(tenant: Tenant) -> None:
    """Raise PermissionDenied unless ``tenant`` has the admin role (repository load/unload)."""
    if not tenant.admin:
        raise PermissionDenied("not_admin", "repository load/unload needs the admin role")


def toml_snippet(name: str, token_hash: str, *, admin: bool = False) -> str:
    """The ``[[serve.tenant]]`` table `wara token` prints for a new tenant."""
    Tenant(name, admin=admin, tokens=(token_hash,))  # validates both
    grant = ("admin = true              # every adapter, and repository load/unload" if admin else
             f'adapters = ["{name}-*"]     # the adapter names or patterns this tenant may use')
    return f'[[serve.tenant]]\nname = "{name}"\n{grant}\ntokens = ["{token_hash}"]\n'


MAX_LOGGED_KEYS = 16  # metadata keys a refusal line names
MAX_KEY = 40  # characters of each


def metadata_keys(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The keys of ``metadata`` for a log line, never a value: a credential sent under any key
    (``authorization``, ``x-api-key``, ``authorization-bin``, ...) stays out of the log. Sorted
    and unique, at most `MAX_LOGGED_KEYS` of at most `MAX_KEY` characters each."""
    keys = sorted({k if len(k) <= MAX_KEY else k[:MAX_KEY] + "..." for k, _ in metadata})
    more = len(keys) - MAX_LOGGED_KEYS
    return ", ".join(keys[:MAX_LOGGED_KEYS]) + (f" (+{more} more)" if more > 0 else "") if keys else "none"


class RefusalLog:
    """Log lines for refused calls: at most ``burst`` in any ``interval`` seconds. Past that a
    refusal is only counted, and one line when the interval ends says how many were suppressed
    (the ``wara_refusals_total`` metric counts every refusal). On an event loop the summary is
    scheduled on it; elsewhere it comes before the next line logged. A line names the caller's
    address, the method, the reason and message, and the metadata keys (`metadata_keys`): never
    a metadata value, so a token sent under a wrong key is not written anywhere."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._window_end = float("-inf")
        self._lines = 0
        self._suppressed = 0
        self._summary_due = False

    def refused(self, method: str, peer: str, reason: str, error: BaseException,
                metadata: Iterable[tuple[str, str | bytes]]) -> None:
        now = time.monotonic()
        with self._lock:
            summary = self._roll(now)
            logged = self._lines < self.burst
            if logged:
                self._lines += 1
            else:
                self._suppressed += 1
                self._schedule_summary(self._window_end - now)
        if summary:
            self._log_summary(summary)
        if logged:
            self.logger.warning("refused %s from %s: %s (%s; metadata keys: %s)", method, peer, reason,
                                error, metadata_keys(metadata))

    def _roll(self, now: float) -> int:
        """Start a new interval once the current one has ended; the count it suppressed."""
        if now < self._window_end:
            return 0
        suppressed, self._suppressed = self._suppressed, 0
        self._window_end, self._lines = now + self.interval, 0
        return suppressed

    def _schedule_summary(self, delay: float) -> None:
        if self._summary_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: the next line logged brings the summary
            return
        self._summary_due = True
        loop.call_later(max(0.0, delay), self._summarize)

    def _summarize(self) -> None:
        with self._lock:
            self._summary_due = False
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            self._log_summary(suppressed)

    def _log_summary(self, suppressed: int) -> None:
        self.logger.warning("suppressed %d refusal log lines (at most %d per %.0fs; wara_refusals_total counts "
                            "every refusal)", suppressed, self.burst, self.interval)


class Authenticator:
    """Maps a call's credentials to its `Tenant`. Auth is on when any tenant is configured.
    ``refusals`` logs the calls refused (`RefusalLog`, shared by the edge's interceptor and
    handlers)."""

    def __init__(self, tenants: Sequence[Tenant]) -> None:
        self.tenants = tuple(tenants)
        self.refusals = RefusalLog(logging.getLogger("wara.serve"))
        self._by_name: dict[str, Tenant] = {}
        self._by_hash: dict[str, Tenant] = {}
        self._by_subject: dict[str, Tenant] = {}
        self._by_cn: dict[str, Tenant] = {}  # from subject entries that are just CN=name
        for t in self.tenants:
            if not isinstance(t, Tenant):
                raise ConfigError(f"a tenant must be a Tenant, not {type(t).__name__}")
            if t.name == OPEN_NAME:
                raise ConfigError(f"the tenant name {OPEN_NAME!r} is reserved (the caller when auth is off)")
            if t.name in self._by_name:
                raise ConfigError(f"two tenants are named {t.name!r}")
            self._by_name[t.name] = t
            if not (t.tokens or t.subjects):
                raise ConfigError(f"tenant {t.name!r} has no tokens and no subjects, so it can never "
                                  "authenticate: add tokens = [\"sha256:...\"] (`wara token`) or subjects")
            if not (t.admin or t.adapters):
                raise ConfigError(f"tenant {t.name!r} may use no adapter: give adapters = [names or "
                                  "patterns] or admin = true")
            for h in t.tokens:
                self._claim(self._by_hash, h, t, f"the token hash {h[:15]}...")
            for s in t.subjects:
                self._claim(self._by_subject, s, t, f"the subject {clip(s)}")
                subject = parse_subject(s)
                if subject.cn_only:
                    self._by_cn[subject.common_name] = t
        for s, t in self._by_subject.items():  # CN=x for A and CN=x,O=B for B: which one is it?
            other = self._by_cn.get(parse_subject(s).common_name)
            if other is not None and other is not t:
                raise ConfigError(f"tenants {other.name!r} and {t.name!r} both match a certificate with the "
                                  f"subject {clip(s)} ({other.name!r} lists its CN alone); a credential "
                                  "belongs to one tenant")

    @staticmethod
    def _claim(index: dict[str, Tenant], key: str, tenant: Tenant, what: str) -> None:
        other = index.setdefault(key, tenant)
        if other is not tenant:
            raise ConfigError(f"tenants {other.name!r} and {tenant.name!r} both list {what}; "
                              "a credential belongs to one tenant")

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]],
                 auth_context: Mapping[str, Sequence[bytes]]) -> Tenant:
        """The tenant of a call, from its metadata (an ``authorization: Bearer <token>`` header)
        or, without that header, its verified client certificate. A bearer header wins over a
        certificate and is never retried as one. Raises Unauthenticated."""
        if not self.enabled:
            return OPEN
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if values:
            match = BEARER.fullmatch(values[0]) if len(values) == 1 and isinstance(values[0], str) else None
            if match is None:
                raise Unauthenticated("malformed_header", "the 'authorization' metadata must be one value "
                                                          "'Bearer <token>'")
            tenant = self._by_hash.get(hash_token(match.group(1)))
            if tenant is None:
                raise Unauthenticated("unknown_token", "the bearer token is not known to this server")
            return tenant
        if not has_client_certificate(auth_context):
            raise Unauthenticated("missing_credentials", "this server needs credentials: the metadata "
                                  "'authorization: Bearer <token>' or a client certificate")
        subject = certificate_subject(auth_context) if self._by_subject else None
        tenant = None if subject is None else self._by_subject.get(subject.canonical) or (
            self._by_cn.get(subject.common_name) if subject.common_name is not None else None)
        if tenant is None:
            raise _unknown_subject(subject)
        return tenant

    def screen(self, metadata: Iterable[tuple[str, str | bytes]], *, certificates: bool) -> Tenant | None:
        """What a call's metadata alone says, before its body is read: its tenant, or None when
        only its client certificate can tell (``certificates``: the transport verifies client
        certificates, which `identify` sees and this does not). Raises Unauthenticated exactly
        where `identify` would: a malformed or unknown bearer token, no credential on a
        transport without client certificates, a certificate when no tenant lists a subject."""
        if not self.enabled:
            return OPEN
        metadata = tuple(metadata)
        if certificates and not any(k.lower() == "authorization" for k, _ in metadata):
            if self._by_subject:
                return None
            raise _unknown_subject(None)
        return self.identify(metadata, {})


def _unknown_subject(subject: Subject | None) -> Unauthenticated:
    shown = f" {clip(subject.canonical)}" if subject is not None else ""
    return Unauthenticated("unknown_subject", f"no tenant lists the client certificate subject{shown}")


def has_client_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> bool:
    """Whether a grpc ``auth_context()`` holds a client certificate. grpc (1.85) puts one there
    only after verifying it against the server's client CA: ``transport_security_type``
    [b"ssl"] with ``x509_subject`` [b"CN=...,O=..."], ``x509_common_name`` and ``x509_pem_cert``.
    TLS without a client certificate has no ``x509_*`` key; plaintext has [b"insecure"]."""
    return (list(auth_context.get("transport_security_type") or ()) == [b"ssl"]
            and bool(auth_context.get("x509_subject") or auth_context.get("x509_pem_cert")))


def certificate_subject(auth_context: Mapping[str, Sequence[bytes]]) -> Subject | None:
    """The subject of the client certificate in a grpc ``auth_context()``: from ``x509_subject``,
    else parsed from ``x509_pem_cert``; None without a certificate or when neither parses."""
    if not has_client_certificate(auth_context):
        return None
    raw = auth_context.get("x509_subject")
    if raw:
        try:
            return parse_subject(raw[0].decode("utf-8"))
        except ValueError:  # UnicodeDecodeError too; the PEM is the certificate itself
            pass
    pem = auth_context.get("x509_pem_cert")
    try:
        return parse_subject(_x509().load_pem_x509_certificate(pem[0]).subject.rfc4514_string()) if pem else None
    except ValueError:
        return None

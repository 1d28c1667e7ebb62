"""Authentication and tenancy (runtime/auth.py), TLS with reload and mTLS (runtime/tls.py) on a
real grpc.aio server on 127.0.0.1 port 0, and the `wara token` CLI run as a user runs it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from certs import Authority
from runtime.auth import (OPEN, Authenticator, PermissionDenied, Tenant, Unauthenticated, certificate_subject,
                          hash_token, new_token, require_admin, toml_snippet)
from runtime.tls import ReloadableCredentials, TlsConfig
from wara_train.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
UA = ("user-agent", "grpc-python-asyncio/1.85.3 grpc-c/52.0.0 (linux; chttp2)")
TOKEN_A, TOKEN_B, TOKEN_ADMIN = new_token(), new_token(), new_token()


def tenants() -> list[Tenant]:
    return [
        Tenant("acme", adapters=["acme-*", "shared"], tokens=[hash_token(TOKEN_A)], subjects=["CN=acme-client,O=Acme"]),
        Tenant("beta", adapters=("beta-?",), tokens=(hash_token(TOKEN_B),), subjects=("CN=beta-client",)),
        Tenant("ops", admin=True, tokens=(hash_token(TOKEN_ADMIN),)),
    ]


def reason(call) -> str:
    with pytest.raises(Unauthenticated) as e:
        call()
    return e.value.reason


# -- tokens and tenants ---------------------------------------------------------------------------

def test_hash_token_is_sha256_of_utf8_and_new_tokens_are_random():
    assert hash_token("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_token("é") == "sha256:" + hashlib.sha256("é".encode()).hexdigest()
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(re.fullmatch(r"wara_[A-Za-z0-9_-]{43}", t) for t in tokens)


def test_tenant_lists_become_tuples_and_subjects_canonical():
    t = Tenant.from_table({"name": "acme", "adapters": ["acme-*"], "tokens": [hash_token("x")],
                           "subjects": ["2.5.4.3=acme-client"], "max_adapters": 3, "max_queue": 8})
    assert t.adapters == ("acme-*",) and t.tokens == (hash_token("x"),) and t.subjects == ("CN=acme-client",)
    assert (t.max_adapters, t.max_queue, t.admin) == (3, 8, False)
    assert hash(t)  # frozen and hashable, so a tenant can key per-tenant counters


@pytest.mark.parametrize("fields, message", [
    ({"name": "bad name"}, "tenant name 'bad name' must match"),
    ({"name": "-x"}, "must match"),
    ({"name": "a" * 65}, "must match"),
    ({"name": 7}, "must match"),
    ({"adapters": "acme-*"}, "tenant 'acme': adapters must be a list of strings, not str"),
    ({"adapters": ["ok", 3]}, "tenant 'acme': adapters[1] must be a non-empty string, not int"),
    ({"adapters": [""]}, "adapters[0] must be a non-empty string"),
    ({"admin": "yes"}, "tenant 'acme': admin must be true or false"),
    ({"tokens": "sha256:" + "0" * 64}, "tokens must be a list of strings"),
    ({"tokens": ["sha256:" + "A" * 64]}, "tokens[0]"),
    ({"subjects": ["CN=a, O=b"]}, "tenant 'acme': subjects[0] 'CN=a, O=b' is not a distinguished name"),
    ({"subjects": [""]}, "subjects[0] must be a non-empty string"),
    ({"max_adapters": 0}, "tenant 'acme': max_adapters must be a positive integer or absent, not 0"),
    ({"max_adapters": True}, "max_adapters must be a positive integer"),
    ({"max_queue": None}, "tenant 'acme': max_queue must be a positive integer, not None"),
    ({"max_queue": 2.0}, "max_queue must be a positive integer"),
])
def test_tenant_fields_are_validated(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Tenant(**{"name": "acme", "adapters": ("acme-*",), **fields})


def test_a_plain_token_in_the_config_is_refused_without_echoing_it():
    token = new_token()
    with pytest.raises(ConfigError) as e:
        Tenant("acme", adapters=["acme-*"], tokens=[hash_token("x"), token])
    message = str(e.value)
    assert "tenant 'acme': tokens[1]" in message and "wara token" in message and "hash" in message
    assert token[:9] not in message and token[8:] not in message
    assert token[:8] in message  # the start names which entry it is
    with pytest.raises(ConfigError) as e:
        Tenant("acme", tokens=["hunter2"])
    assert "hunter2" not in str(e.value) and "hunt" not in str(e.value)  # never half a short value


def test_from_table_lists_the_valid_keys_and_reserves_the_open_name():
    with pytest.raises(ConfigError, match="unknown key.*'token'.*valid keys: name, adapters, admin, tokens, subjects, "
                                          "max_adapters, max_queue"):
        Tenant.from_table({"name": "acme", "token": [hash_token("x")]})
    with pytest.raises(ConfigError, match="needs a name"):
        Tenant.from_table({"adapters": ["x"]})
    with pytest.raises(ConfigError, match="reserved"):
        Tenant.from_table({"name": "-", "admin": True})
    with pytest.raises(ConfigError, match="must be a table"):
        Tenant.from_table(["acme"])


def test_the_printed_snippet_is_a_valid_tenant_table():
    for admin in (False, True):
        table = tomllib.loads(toml_snippet("acme", hash_token("t"), admin=admin))["serve"]["tenant"][0]
        t = Tenant.from_table(table)
        assert t.tokens == (hash_token("t"),) and t.admin is admin
        assert t.may_use("acme-x") and t.may_use("other") is admin


def test_may_use_matches_names_and_globs_case_sensitively():
    acme, beta, ops = tenants()
    assert acme.may_use("acme-sentiment") and acme.may_use("shared") and acme.may_use("acme-")
    assert not acme.may_use("ACME-sentiment") and not acme.may_use("shared2") and not acme.may_use("beta-1")
    assert beta.may_use("beta-1") and not beta.may_use("beta-12") and not beta.may_use("beta-")
    assert ops.may_use("anything") and OPEN.may_use("anything")
    assert Tenant("x", adapters=["[ab]*"]).may_use("b1") and not Tenant("x", adapters=["[ab]*"]).may_use("c1")


def test_require_admin():
    require_admin(OPEN)
    require_admin(tenants()[2])
    with pytest.raises(PermissionDenied, match="repository load/unload needs the admin role") as e:
        require_admin(tenants()[0])
    assert e.value.reason == "not_admin"


# -- the authenticator ----------------------------------------------------------------------------

def test_authenticator_checks_across_tenants():
    acme = tenants()[0]
    with pytest.raises(ConfigError, match="two tenants are named 'acme'"):
        Authenticator([acme, Tenant("acme", admin=True, tokens=[hash_token("other")])])
    with pytest.raises(ConfigError, match="tenants 'acme' and 'copy' both list the token hash sha256:"):
        Authenticator([acme, Tenant("copy", admin=True, tokens=[hash_token(TOKEN_A)])])
    with pytest.raises(ConfigError, match="tenants 'acme' and 'copy' both list the subject 'CN=acme-client,O=Acme'"):
        Authenticator([acme, Tenant("copy", admin=True, subjects=["CN=acme-client,O=Acme"])])
    with pytest.raises(ConfigError, match="tenants 'cn' and 'acme' both match a certificate"):
        Authenticator([Tenant("cn", admin=True, subjects=["CN=acme-client"]), acme])
    with pytest.raises(ConfigError, match="tenant 'idle' has no tokens and no subjects"):
        Authenticator([acme, Tenant("idle", adapters=["x"])])
    with pytest.raises(ConfigError, match="tenant 'none' may use no adapter"):
        Authenticator([Tenant("none", tokens=[hash_token("n")])])
    with pytest.raises(ConfigError, match="reserved"):
        Authenticator([OPEN])
    assert Authenticator(tenants()).enabled and not Authenticator([]).enabled


# auth_context as grpcio 1.85 gives it (recorded from a real TLS handshake, PEM cut short)
SSL_NO_CERT = {"transport_security_type": [b"ssl"], "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"],
               "ssl_session_reused": [b"false"], "ssl_tls_version": [b"TLSv1.3"]}


def cert_context(subject: bytes, pem: bytes = b"-----BEGIN CERTIFICATE-----\n...") -> dict:
    cn = re.search(rb"CN=([^,]*)", subject)
    return {**SSL_NO_CERT, "x509_subject": [subject], "x509_common_name": [cn.group(1) if cn else b""],
            "x509_pem_cert": [pem]}


@pytest.mark.parametrize("metadata, context, expected", [
    ((UA, ("authorization", f"Bearer {TOKEN_A}")), {}, "acme"),
    ((("authorization", f"bearer   {TOKEN_B}"), UA), {}, "beta"),
    ((("authorization", f"BEARER {TOKEN_ADMIN}"),), SSL_NO_CERT, "ops"),
    ((UA,), cert_context(b"CN=acme-client,O=Acme"), "acme"),
    ((UA,), cert_context(b"CN=beta-client"), "beta"),
    ((UA,), cert_context(b"CN=beta-client,O=Anyone"), "beta"),  # "CN=name" matches the common name alone
    ((("authorization", f"Bearer {TOKEN_B}"),), cert_context(b"CN=acme-client,O=Acme"), "beta"),  # token wins
    ((UA,), {}, "missing_credentials"),
    ((UA,), {"transport_security_type": [b"insecure"]}, "missing_credentials"),
    ((UA,), SSL_NO_CERT, "missing_credentials"),
    ((UA, ("x-api-key", TOKEN_A)), {}, "missing_credentials"),
    ((("authorization", TOKEN_A),), {}, "malformed_header"),
    ((("authorization", f"Basic {TOKEN_A}"),), {}, "malformed_header"),
    ((("authorization", "Bearer "),), {}, "malformed_header"),
    ((("authorization", f"Bearer {TOKEN_A} extra"),), {}, "malformed_header"),
    ((("authorization", f"Bearer\t{TOKEN_A}"),), {}, "malformed_header"),
    ((("authorization", f"Bearer {TOKEN_A}"), ("authorization", f"Bearer {TOKEN_A}")), {}, "malformed_header"),
    ((("authorization", f"Bearer {TOKEN_A}x"),), {}, "unknown_token"),
    ((("authorization", f"Bearer {TOKEN_A.upper()}"),), {}, "unknown_token"),
    ((("authorization", "Bearer wrong"),), cert_context(b"CN=acme-client,O=Acme"), "unknown_token"),  # no fallback
    ((UA,), cert_context(b"CN=acme-client,O=Other"), "unknown_subject"),
    ((UA,), cert_context(b"O=Acme,CN=acme-client"), "unknown_subject"),  # attribute order is part of the name
    ((UA,), cert_context(b"CN=stranger"), "unknown_subject"),
])
def test_identify(metadata, context, expected):
    auth = Authenticator(tenants())
    if expected in {t.name for t in tenants()}:
        assert auth.identify(metadata, context).name == expected
    else:
        with pytest.raises(Unauthenticated) as e:
            auth.identify(metadata, context)
        assert e.value.reason == expected
        for token in (TOKEN_A, TOKEN_B, TOKEN_ADMIN):
            assert token[5:13] not in str(e.value)  # no part of a token beyond the "wara_" prefix


def test_identify_with_auth_off_is_the_open_principal():
    auth = Authenticator([])
    assert auth.identify((UA,), {}) is OPEN
    assert auth.identify((("authorization", "garbage"),), {}) is OPEN


def test_the_subject_falls_back_to_the_pem_certificate(tmp_path):
    ca = Authority(tmp_path)
    cert, _ = ca.client("acme-client", "Acme")
    context = {**SSL_NO_CERT, "x509_pem_cert": [cert.read_bytes()]}
    assert certificate_subject(context).canonical == "CN=acme-client,O=Acme"
    assert Authenticator(tenants()).identify((UA,), context).name == "acme"
    # grpc escapes non-ASCII in x509_subject (OpenSSL RFC 2253); it reads as the certificate does
    assert certificate_subject(cert_context(rb"CN=acm\C3\A9,O=Acme")).canonical == "CN=acmé,O=Acme"
    assert certificate_subject(SSL_NO_CERT) is None
    # without any configured subject a certificate identifies no one (and nothing is parsed)
    assert reason(lambda: Authenticator([tenants()[2]]).identify((UA,), cert_context(b"CN=x"))) == "unknown_subject"


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    one, two = Authority(d / "one", "ca-one"), Authority(d / "two", "ca-two")
    return {"one": one, "two": two, "server1": one.server("server"), "server2": two.server("server"),
            "acme": one.client("acme-client", "Acme"), "beta": one.client("beta-client", "Beta"),
            "rogue": two.client("acme-client", "Acme")}


def test_tls_config_names_the_key_and_path_of_a_bad_file(pki, tmp_path):
    cert, key = pki["server1"]
    TlsConfig(str(cert), str(key), client_ca=str(pki["one"].cert))
    missing = str(tmp_path / "nope.pem")
    for kwargs, message in [({"cert": missing}, f"tls_cert: {missing!r} does not exist"),
                            ({"key": missing}, f"tls_key: {missing!r} does not exist"),
                            ({"client_ca": missing}, f"tls_client_ca: {missing!r} does not exist"),
                            ({"cert": str(tmp_path)}, "is not a file"),
                            ({"client_ca": str(pki["one"].cert), "require_client_cert": False},
                             "tls_require_client_cert = true")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TlsConfig(**{"cert": str(cert), "key": str(key), **kwargs})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    other_key = pki["server2"][1]
    for kwargs, message in [({"key": str(other_key)}, "is not the key of the certificate in tls_cert"),
                            ({"cert": str(garbage)}, "tls_cert: "),
                            ({"key": str(cert)}, "tls_key: "),
                            ({"client_ca": str(garbage)}, "tls_client_ca: ")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ReloadableCredentials(TlsConfig(**{"cert": str(cert), "key": str(key), **kwargs}))


def creds(ca: Authority, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.cert.read_bytes(), *(
        (client[1].read_bytes(), client[0].read_bytes()) if client else ()))


async def health_check(port: int, credentials: grpc.ChannelCredentials, metadata=()) -> str:
    """One Check over a fresh connection (a local subchannel pool: no connection reuse)."""
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials,
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5,
                                                                      metadata=metadata)
        except grpc.RpcError as e:
            return e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def live_files(tmp_path: Path, pair: tuple[Path, Path]) -> TlsConfig:
    """Copy a cert/key pair to fixed paths (as a cert manager rotates them) and point a config at them."""
    shutil.copy(pair[0], tmp_path / "tls.crt")
    shutil.copy(pair[1], tmp_path / "tls.key")
    return TlsConfig(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_reload_swaps_the_certificate_for_new_connections(pki, tmp_path, kind, caplog):
    async def main():
        tls = live_files(tmp_path, pki["server1"])
        reloadable = ReloadableCredentials(tls)
        if kind == "aio":
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        else:
            server = grpc.server(futures.ThreadPoolExecutor(2))
            health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", reloadable.server_credentials())
        await server.start() if kind == "aio" else server.start()
        try:
            one, two = creds(pki["one"]), creds(pki["two"])
            assert await health_check(port, one) == "SERVING"
            assert await health_check(port, two) == "UNAVAILABLE"
            async with grpc.aio.secure_channel(f"localhost:{port}", one,
                                               options=[("grpc.use_local_subchannel_pool", 1)]) as kept:
                stub = health_pb2_grpc.HealthStub(kept)
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reloadable.reload()  # unchanged files: valid, nothing new to serve
                live_files(tmp_path, pki["server2"])
                assert await health_check(port, one) == "SERVING"  # not before reload()
                assert reloadable.reload()
                assert await health_check(port, two) == "SERVING"
                assert await health_check(port, one) == "UNAVAILABLE"
                assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1  # kept its own

            (tmp_path / "tls.key").write_bytes(pki["server1"][1].read_bytes())  # a key not of this cert
            with caplog.at_level(logging.ERROR, logger="wara.serve"):
                assert not reloadable.reload()
            assert "TLS reload failed, keeping the current certificate: tls_key:" in caplog.text
            assert await health_check(port, two) == "SERVING"
        finally:
            await server.stop(None) if kind == "aio" else server.stop(None)

    asyncio.run(main())


def test_mtls_refuses_clients_without_a_trusted_certificate_and_identifies_the_rest(pki):
    auth = Authenticator(tenants())
    seen = []

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(context.auth_context())
        try:
            return auth.identify(context.invocation_metadata(), context.auth_context()).name.encode()
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    async def call(port: int, credentials, metadata=()) -> str:
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials,
                                           options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                return (await channel.unary_unary("/test.Auth/WhoAmI")(b"", timeout=5, metadata=metadata)).decode()
            except grpc.RpcError as e:
                return e.code().name

    async def main():
        cert, key = pki["server1"]
        tls = TlsConfig(str(cert), str(key), client_ca=str(pki["one"].cert))
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Auth", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)})])
        port = server.add_secure_port("127.0.0.1:0", ReloadableCredentials(tls).server_credentials())
        await server.start()
        try:
            one = pki["one"]
            assert await call(port, creds(one)) == "UNAVAILABLE"  # no client certificate: no handshake
            assert await call(port, creds(one, pki["rogue"])) == "UNAVAILABLE"  # signed by another CA
            assert not seen
            assert await call(port, creds(one, pki["acme"])) == "acme"
            context = seen[-1]
            assert context["transport_security_type"] == [b"ssl"]
            assert context["x509_subject"] == [b"CN=acme-client,O=Acme"]
            assert context["x509_common_name"] == [b"acme-client"]
            assert context["x509_pem_cert"][0] == pki["acme"][0].read_bytes()
            assert await call(port, creds(one, pki["beta"])) == "beta"  # "CN=beta-client" matches O=Beta too
            token = (("authorization", f"Bearer {TOKEN_ADMIN}"),)
            assert await call(port, creds(one, pki["acme"]), token) == "ops"  # a bearer token wins
            bad = (("authorization", "Bearer nope"),)
            assert await call(port, creds(one, pki["acme"]), bad) == "UNAUTHENTICATED"
        finally:
            await server.stop(None)

    asyncio.run(main())


# -- the CLI --------------------------------------------------------------------------------------

def wara(*runs: tuple[tuple[str, ...], str | None]) -> list[tuple[int, str, str]]:
    """Run ``python -m wara token ARGS`` with ``stdin`` for each of ``runs``, side by side (each
    start takes ~3 s: the parser imports torch); (returncode, stdout, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-m", "wara", "token", *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for args, _ in runs]
    outs = [p.communicate(stdin, timeout=60) for p, (_, stdin) in zip(procs, runs)]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def snippet_tenant(stderr: str) -> Tenant:
    return Tenant.from_table(tomllib.loads(stderr[stderr.index("[[serve.tenant]]"):])["serve"]["tenant"][0])


def test_wara_token_prints_a_token_once_and_the_table_with_its_hash():
    (rc, out, err), (bad_rc, bad_out, bad_err) = wara((("--tenant", "acme"), None), (("--hash", "--admin"), "x"))
    assert rc == 0, err
    token = out.strip()
    assert out == token + "\n" and re.fullmatch(r"wara_[A-Za-z0-9_-]{43}", token)
    assert "shown once" in err and token not in err
    tenant = snippet_tenant(err)
    assert tenant.name == "acme" and tenant.adapters == ("acme-*",) and not tenant.admin
    assert tenant.tokens == (hash_token(token),)
    assert Authenticator([tenant]).identify((("authorization", f"Bearer {token}"),), {}) == tenant
    assert (bad_rc, bad_out) == (2, "") and "wara token: error: --hash" in bad_err

    [(rc, out, err)] = wara((("--hash",), token + "\n"))
    assert rc == 0, err
    assert out == hash_token(token) + "\n"


@pytest.mark.parametrize("args, stdin, message", [
    (("--tenant", "bad name"), None, "tenant name 'bad name' must match"),
    (("--hash", "--tenant", "acme"), "x", "takes no --tenant or --admin"),
    (("--hash",), "", "reads one token"),
    (("--hash",), "two words", "reads one token"),
    (("--hash",), "sha256:" + "0" * 64, "not a hash"),
    (("--bogus",), None, "unrecognized arguments: --bogus"),
])
def test_wara_token_refuses_bad_flags(args, stdin, message, monkeypatch, capsys):
    """The same entry point in-process (a subprocess per case would take ~3 s each)."""
    from wara.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    try:
        rc = main(["token", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    assert (rc, out) == (2, "") and message in err


def test_wara_token_admin_snippet(capsys):
    from wara.cli import main

    assert main(["token", "--admin"]) == 0
    out, err = capsys.readouterr()
    tenant = snippet_tenant(err)
    assert tenant.admin and tenant.adapters == () and tenant.tokens == (hash_token(out.strip()),)

"""Authentication at the gRPC edge before a request's body is read.

`AuthInterceptor` runs when a call arrives, before grpc reads its message. When the call's
metadata alone shows it will be refused (`Authenticator.screen`: no credential, a malformed or
unknown bearer token; and a tenant's token on an admin-only method), it answers with a handler of
the streaming-request kind that aborts without asking grpc for the message: the request's bytes
are never read into Python nor parsed, so an unauthenticated call holds no request-sized memory.
Everything else goes to its own handler, which authenticates the call in full
(`Authenticator.identify`), as it must for a call only a client certificate can identify: the
TLS auth context exists in a handler's context only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import grpc

from .auth import Authenticator, require_admin
from .errors import PermissionDenied, Unauthenticated, status_code, status_message

OnRefusal = Callable[[BaseException, str, Any], None]  # (error, method, servicer context): count and log it


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to ``service`` whose metadata shows they will be refused, before their body
    is read. ``open_methods`` need no credential; ``admin_methods`` need the admin role;
    ``certificates``: the transport verifies client certificates (a call without a bearer token
    then goes on to its handler); ``refused`` is called with each refusal (metrics and log)."""

    def __init__(self, auth: Authenticator, service: str, *, open_methods: Collection[str],
                 admin_methods: Collection[str] = (), certificates: bool, refused: OnRefusal) -> None:
        self.auth = auth
        self.prefix = f"/{service}/"
        self.open_methods = frozenset(open_methods)
        self.admin_methods = frozenset(admin_methods)
        self.certificates = certificates
        self.refused = refused

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.auth.enabled or not method.startswith(self.prefix):
            return handler  # health and reflection are other services, open to every caller
        name = method[len(self.prefix):]
        if name in self.open_methods:
            return handler
        try:
            tenant = self.auth.screen(handler_call_details.invocation_metadata or (), certificates=self.certificates)
            if tenant is not None and name in self.admin_methods:
                require_admin(tenant)
        except (Unauthenticated, PermissionDenied) as error:
            return self._refusal(handler, name, error)
        return handler

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str, error: Exception) -> grpc.RpcMethodHandler:
        """A handler that refuses with ``error``. It is of the streaming-request kind whatever the
        method's kind, since grpc reads (and deserializes) a unary request before it calls the
        handler, and a streaming one only when the handler asks; this one never asks."""
        code, message = status_code(error), status_message(error)
        refused = self.refused

        async def refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
            refused(error, method, context)
            await context.abort(code, message)

        if handler.response_streaming:
            make = grpc.stream_stream_rpc_method_handler
        else:
            make = grpc.stream_unary_rpc_method_handler
        return make(refuse, request_deserializer=None,  # never called: nothing is read
                    response_serializer=handler.response_serializer)

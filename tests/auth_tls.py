"""Test servers for MLflow's connection settings: a basic-auth proxy and a TLS proxy in front of the
real MLflow server, on 127.0.0.1 only.

``AuthProxy`` forwards every request (REST API and artifact proxy, bodies streamed) to the server,
answering 401 to a request without the expected ``Authorization: Basic`` header (as MLflow's
``--app-name basic-auth`` does), and records what it saw. Given an ``ssl.SSLContext`` it serves
https, for the certificate cases; ``make_certs`` writes a private CA, a server certificate for
127.0.0.1 signed by it, and a client certificate, with the ``openssl`` command line, at test time.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
from pathlib import Path
from typing import NamedTuple

from aiohttp import web

from servers import BackgroundApp, stream_through


class Seen(NamedTuple):
    method: str
    path: str
    authorized: bool


class AuthProxy(BackgroundApp):
    """A reverse proxy to ``upstream`` that wants basic auth (when ``username`` is given) and serves
    https with ``ssl_context`` (when given)."""

    def __init__(
        self,
        upstream: str,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(ssl_context)
        self.upstream = upstream.rstrip("/")
        self.expected = (
            None
            if username is None
            else "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        )
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.seen: list[Seen] = []

    def refused(self, fragment: str = "") -> list[Seen]:
        return [s for s in self.seen if not s.authorized and fragment in s.path]

    def accepted(self, fragment: str = "") -> list[Seen]:
        return [s for s in self.seen if s.authorized and fragment in s.path]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        authorized = self.expected is None or request.headers.get("Authorization") == self.expected
        self.seen.append(Seen(request.method, request.path, authorized))
        if not authorized:
            return web.Response(
                status=401, text="You are not authenticated.", headers={"WWW-Authenticate": "Basic"}
            )
        target = self.upstream + request.rel_url.raw_path
        if request.rel_url.raw_query_string:
            target += f"?{request.rel_url.raw_query_string}"
        assert self._session is not None
        return await stream_through(self._session, request, target)

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{rest:.*}", self._forward)


class Certs(NamedTuple):
    ca: Path  # the private CA's certificate (MLFLOW_TRACKING_SERVER_CERT_PATH)
    server_cert: Path
    server_key: Path
    client: Path  # the client's certificate and key in one PEM (MLFLOW_TRACKING_CLIENT_CERT_PATH)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    d = directory
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tracklane test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=tracklane test client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        extra = ["-extfile", str(d / "server.ext")] if name == "server" else []
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(d / f"{name}.pem"), *extra)  # fmt: skip
    client = d / "client-bundle.pem"
    client.write_text((d / "client.pem").read_text() + (d / "client.key").read_text())
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", client)


def server_context(certs: Certs, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(certs.ca))
    return ctx

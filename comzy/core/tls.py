"""The server's TLS: SSL_CERT_PATH/SSL_KEY_PATH checked and loaded once, before anything listens.

The same context secures the agent listener (its WebSocket and account API) that the public
listener's certificate files secure: a server configured for TLS never takes agents' tokens in
clear. Every mistake a self-hoster makes with the two files (a path to nothing, a directory, an
unreadable file, a key that does not belong to the certificate, something that is not PEM) is one
line naming the variable they set, so ``comzy-server`` can refuse to start instead of printing
"ready" and failing at the first handshake.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio.abc

if TYPE_CHECKING:
    from comzy.core.settings import ServerSettings

#: What a request in clear on a TLS port begins with (nginx answers these with a 400 too).
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")

#: The first byte of a TLS record carrying a handshake (a ClientHello).
TLS_HANDSHAKE_RECORD = 0x16


class TLSConfigError(ValueError):
    """SSL_CERT_PATH or SSL_KEY_PATH cannot serve TLS; the message is one line naming the variable."""


def server_tls_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The server-side context of SSL_CERT_PATH and SSL_KEY_PATH, or None when neither is set.

    Raises TLSConfigError, naming the variable as the user wrote it (``SSL_CERT_PATH`` or
    ``COMZY_SSL_CERT_PATH``), when only one is set or either file cannot be used.
    """
    # Here, not at the top: the agent imports this module for its side and needs no server settings.
    from comzy.core.settings import ServerSettings, variable_name

    cert_var = variable_name(ServerSettings, "ssl_cert_path")
    key_var = variable_name(ServerSettings, "ssl_key_path")
    cert, key = settings.ssl_cert_path, settings.ssl_key_path
    if cert is None and key is None:
        return None
    if key is None:
        raise TLSConfigError(f"{cert_var} is set but {key_var} is not (or is empty); set both for TLS, or neither")
    if cert is None:
        raise TLSConfigError(f"{key_var} is set but {cert_var} is not (or is empty); set both for TLS, or neither")
    _read_pem(cert, cert_var, "certificate", b"-----BEGIN CERTIFICATE-----")
    _read_pem(key, key_var, "private key", b"PRIVATE KEY-----")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # The agent link is HTTP/1.1 (a WebSocket upgrade or an account API call).
    context.set_alpn_protocols(["http/1.1"])

    def encrypted_key() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal, which a service has not got.
        raise TLSConfigError(f"{key_var}={key}: the key is encrypted; comzy-server needs it without a passphrase "
                             f"(openssl pkey -in {key} -out {key}.plain)")

    try:
        context.load_cert_chain(cert, key, password=encrypted_key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"{key_var}={key}: this key does not belong to the certificate in "
                                 f"{cert_var}={cert}; set the pair that was issued together") from None
        raise TLSConfigError(f"{cert_var}={cert} / {key_var}={key}: OpenSSL cannot load them "
                             f"({exc.reason or exc}); give a PEM certificate (chain) and its PEM key") from None
    return context


def _read_pem(path: Path, variable: str, what: str, marker: bytes) -> None:
    """Check that ``path`` is a readable file holding a PEM ``what`` (``marker`` in its text)."""
    where = f"{variable}={path}"
    if path.is_dir():
        raise TLSConfigError(f"{where} is a directory; set it to the {what} file (PEM)")
    if not path.exists():
        raise TLSConfigError(f"{where}: no such file; set it to the {what} file (PEM)")
    if not os.access(path, os.R_OK):
        raise TLSConfigError(f"{where}: permission denied; let the user running comzy-server read it")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if marker not in text:
        raise TLSConfigError(f"{where} holds no PEM {what} (no '{marker.decode().strip('-')}' block); "
                             "convert it to PEM, e.g. with openssl x509 -inform der / openssl pkey")


def looks_like_http(first_bytes: bytes) -> bool:
    """Whether the first bytes of a connection are a plain HTTP request (not a TLS ClientHello)."""
    # A short first read ("GE") counts too: a ClientHello never starts with a letter.
    return bool(first_bytes) and any(first_bytes.startswith(method) or method.startswith(first_bytes)
                                     for method in HTTP_METHODS)


def plain_http_on_tls_port(host: str, port: int) -> bytes:
    """The 400 a plaintext HTTP request on the TLS agent port gets: it tells the agent what to use."""
    body = f"{PLAIN_ON_TLS_HINT}: use wss://{host}:{port}\n".encode()
    return (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


# -- the agent's side ----------------------------------------------------------------------------

def client_tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """What the agent trusts for everything it does (the tunnel, ``login``, ``status``, ``aliases``):
    the system's CAs, or SSL_CERT_FILE/SSL_CERT_DIR where set (OpenSSL reads them); with ``cafile``
    (``--cacert FILE``) that file's CAs instead, as curl's --cacert.

    Raises ValueError (one line) when ``cafile`` cannot be read as PEM certificates.
    """
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"--cacert {cafile}: cannot load CA certificates from it ({reason}); "
                         "give a PEM file of the CA that signed the server's certificate") from None


def mismatch(url: str, exc: BaseException | str) -> str | None:
    """The one line for an agent that speaks TLS to a plain port or plain to a TLS port, or whose
    TLS does not trust the server's certificate; None when ``exc`` (what the connection failed
    with, or the text of a plain HTTP answer) is something else."""
    parts = urlsplit(url)
    place = parts.netloc.rsplit("@", 1)[-1]
    secure = parts.scheme in ("wss", "https")
    if secure and isinstance(exc, BaseException):
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (f"{url}: the server's certificate is not trusted ({cause.verify_message}); trust its CA with "
                    "SSL_CERT_FILE=CA.pem or --cacert CA.pem")
        reason = (getattr(cause, "reason", None) or "") if cause is not None else ""
        if reason in _NOT_TLS_REASONS or "EOF" in reason.upper():
            return f"{url} does not speak TLS on this port: use ws://{place}"
        return None
    # A refused upgrade (HandshakeRejected) carries the 400's body; an account call, its text.
    body = getattr(exc, "body", None)
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(exc)
    if not secure and PLAIN_ON_TLS_HINT in text:
        return f"{url} answered in plain text: the server speaks TLS on this port, use wss://{place}"
    return None


#: What the 400 for plain HTTP on the TLS agent port says (the agent recognises it by this).
PLAIN_ON_TLS_HINT = "this port speaks TLS"

#: OpenSSL's reasons for a TLS handshake answered by something that is not TLS.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                              "UNEXPECTED_EOF_WHILE_READING", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"})


class PrefixedStream(anyio.abc.ByteStream):
    """``stream`` with ``prefix`` (bytes already read from it) put back in front: what the agent
    port read to tell TLS from plain HTTP still reaches the TLS handshake or the HTTP parser.

    Once the prefix is consumed, ``receive`` is the wrapped stream's own method, so the agent link's
    hot path pays nothing for the wrapper; extra attributes (the peer's address) are the stream's.
    """

    def __init__(self, stream: anyio.abc.ByteStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix
        self.send = stream.send  # type: ignore[method-assign]  # no indirection per frame

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The prefix first (up to ``max_bytes``), then whatever the stream receives."""
        if not self._prefix:
            self.receive = self.stream.receive  # type: ignore[method-assign]
            return await self.stream.receive(max_bytes)
        chunk, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
        if not self._prefix:
            self.receive = self.stream.receive  # type: ignore[method-assign]
        return chunk

    async def send(self, item: bytes) -> None:
        """Send on the stream (replaced by the stream's own method at construction)."""
        await self.stream.send(item)

    @property
    def prefix(self) -> bytes:
        """What is left of the prefix (the agent link takes it when it takes the socket over)."""
        return self._prefix

    async def send_eof(self) -> None:
        """Half-close the stream."""
        await self.stream.send_eof()

    async def aclose(self) -> None:
        """Close the stream."""
        await self.stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The stream's (the peer's address, the raw socket...)."""
        return self.stream.extra_attributes

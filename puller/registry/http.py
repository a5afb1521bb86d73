"""HTTP/1.1 requests of the registry client (manifests, tokens, redirects, the first range of a blob): a pool of
kept-alive connections, h11 for the protocol, every wait bounded.

puller talks to registries through this module and :mod:`.lean` (the ranges that carry nearly every byte), not
through aiohttp: importing aiohttp costs about 0.2 CPU-s (it loads the system's CA certificates into two SSL
contexts at import), which was the largest part of ``puller pull``'s start-up and, on a 1 GiB image, 8% of its
CPU (benchmarks/README.md). Here a TLS context is made only when a host speaks TLS.

It does what the client needs and no more: GET and POST, no redirects (the client follows them by hand, so
credentials stay on their origin), no cookies, no proxies, the body as the server framed it (Content-Length,
chunked or until close; decoding an encoded body is :mod:`.bodies`' job). Waits: connecting within
``connect_s``, the answer's head within ``headers_s`` of sending, each body read within ``read_s``. Network
failures raise :class:`ConnectionFailed` (a :class:`~puller.errors.TransportError`) with the host in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Callable, Hashable, Iterator, Mapping
from types import MappingProxyType
from typing import Generic, NamedTuple, Protocol, TypeVar, overload
from urllib.parse import urlsplit

import h11

from ..errors import TransportError

MAX_HEAD = 64 * 1024  # an answer's status line and headers
READ_SIZE = 256 * 1024  # bytes asked of the socket per read
MAX_IDLE = 64  # idle connections kept, all origins together
MAX_DISCARD = 64 * 1024  # a body read to its end only to keep its connection (a redirect's, a 401's)

SSLFor = Callable[[str], ssl.SSLContext | bool]  # the TLS of a URL: a context, or verify (True) or not (False)


class Timeouts(NamedTuple):
    connect_s: float
    headers_s: float  # from sending the request to the end of the answer's head
    read_s: float  # between two reads of the body
    dial_s: Mapping[str, float] = MappingProxyType({})  # "host:port" -> its own connect timeout (dial_timeout)

    def connect_for(self, host: str, port: int) -> float:
        """The connect timeout of ``host:port``: its hosts.toml ``dial_timeout``, else ``connect_s``."""
        return self.dial_s.get(f"{host}:{port}", self.connect_s)


class ConnectionFailed(TransportError):
    """The connection failed: refused, reset, closed early, timed out, or the server broke HTTP."""


class TLSNotTrusted(ConnectionFailed):
    """The server's TLS certificate did not verify (``reason`` says why)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class TLSFailed(ConnectionFailed):
    """The TLS handshake failed for another reason (a server that speaks plain HTTP, say)."""


@contextlib.contextmanager
def connect_errors(netloc: str, tls: bool) -> Iterator[None]:
    """A connection attempt's failures (a timeout included) as puller's errors, naming ``netloc``; ``tls``: the
    attempt includes a TLS handshake. Both clients connect under it (this module's pool and :mod:`.lean`)."""
    try:
        yield
    except TimeoutError:
        raise ConnectionFailed(f"{netloc}: connect timed out") from None
    except ssl.SSLCertVerificationError as e:
        reason = e.verify_message or e.reason or str(e)
        raise TLSNotTrusted(f"{netloc}: TLS certificate not trusted ({reason})", reason) from None
    except ssl.SSLError as e:
        raise TLSFailed(f"{netloc}: TLS: {e.reason or e}") from None
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
        if tls:  # closed during the handshake
            raise TLSFailed(f"{netloc}: TLS: {e.strerror or e}") from None
        raise ConnectionFailed(f"{netloc}: {e.strerror or e}") from None
    except OSError as e:
        raise ConnectionFailed(f"{netloc}: {e.strerror or e}") from None


class Pooled(Protocol):
    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Pooled)


class IdleConnections(Generic[C]):
    """Kept-alive connections by origin for the next request, at most MAX_IDLE in all (a registry may redirect
    anywhere); those the servers closed meanwhile are dropped, of every origin (a daemon meets many over weeks)."""

    def __init__(self) -> None:
        self._idle: dict[Hashable, list[C]] = {}

    def take(self, origin: Hashable) -> C | None:
        idle = self._idle.get(origin, [])
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            conn.close()
        return None

    def keep(self, origin: Hashable, conn: C) -> None:
        """Keep ``conn`` for ``origin``, or close it when the pool is full or the server closed it."""
        for key, conns in list(self._idle.items()):
            conns[:] = [c for c in conns if not c.closed]
            if not conns:
                del self._idle[key]
        if conn.closed or sum(map(len, self._idle.values())) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.setdefault(origin, []).append(conn)

    def __iter__(self) -> Iterator[C]:
        return (conn for conns in self._idle.values() for conn in conns)

    def close(self) -> None:
        for conn in self:
            conn.close()
        self._idle.clear()


def tls_for(ssl_for: SSLFor, url: str) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (None for plain HTTP): the one ``ssl_for`` gives, or a default one."""
    if urlsplit(url).scheme != "https":
        return None
    wanted = ssl_for(url)
    return wanted if isinstance(wanted, ssl.SSLContext) else tls_context(wanted)


@functools.cache
def tls_context(verify: bool) -> ssl.SSLContext:
    """The default TLS context (system CAs), or one that verifies nothing; made once, when first needed."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Headers:
    """An answer's headers: names case-insensitive, a name may come more than once."""

    __slots__ = ("_values",)

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self._values: dict[str, list[str]] = {}
        for name, value in raw:
            self._values.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def getall(self, name: str, default: list[str] | None = None) -> list[str]:
        return list(self._values.get(name.lower(), default if default is not None else []))

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()][0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values


Origin = tuple[str, str, int, int]  # scheme, host, port, the id of the TLS context


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, netloc: str):
        self.reader = reader
        self.writer = writer
        self.netloc = netloc
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.received = False  # a byte of the current answer arrived

    @property
    def closed(self) -> bool:
        return self.writer.is_closing() or self.reader.at_eof()

    def close(self) -> None:
        transport = self.writer.transport
        transport.abort()

    def answer_complete(self) -> bool:
        """The answer ends with the bytes received so far (no I/O; anything still buffered is dropped)."""
        try:
            return isinstance(self.h11.next_event(), h11.EndOfMessage)
        except h11.ProtocolError:
            return False

    async def next_event(self, read_s: float) -> object:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise ConnectionFailed(f"{self.netloc}: bad HTTP answer: {e}") from None
            if event is not h11.NEED_DATA:
                return event
            try:
                async with asyncio.timeout(read_s):  # not wait_for: on 3.11 it can lose a cancellation
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                raise ConnectionFailed(f"{self.netloc}: timed out waiting {read_s:.0f} s for the next bytes") from None
            except OSError as e:
                raise ConnectionFailed(f"{self.netloc}: {e.strerror or e}") from None
            self.received = self.received or bool(data)
            self.h11.receive_data(data)  # b"": the server closed the connection


class _Stale(Exception):
    """A kept-alive connection closed before any byte of the answer: safe to ask again on a new one."""


class Response:
    """An answer; read its body with :meth:`readany`, then :meth:`release` it (or use ``async with``)."""

    def __init__(self, pool: HttpPool, origin: Origin, conn: _Connection, status: int, headers: Headers, url: str):
        self._pool = pool
        self._origin = origin
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self.url = url
        self._ended = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def readany(self) -> bytes:
        """The next bytes of the body; b"" at its end."""
        conn = self._conn
        if self._ended or conn is None:
            return b""
        try:
            event = await conn.next_event(self._pool.timeouts.read_s)
        except BaseException:
            self.release()
            raise
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self._ended = True
            self.release()
            return b""
        self.release()
        raise ConnectionFailed(f"{conn.netloc}: the answer ended early")

    async def discard(self) -> None:
        """Read what is left of a small body (at most MAX_DISCARD bytes, within one read timeout) so that its
        connection serves the next request; a longer body, or a failure, closes the connection instead."""
        left = MAX_DISCARD
        try:
            async with asyncio.timeout(self._pool.timeouts.read_s):
                while left > 0 and not self._ended and self._conn is not None:
                    left -= len(await self.readany())
        except (ConnectionFailed, TimeoutError):
            pass
        finally:
            self.release()

    def release(self) -> None:
        """Hand the connection back (kept for the next request if the whole answer was read), else close it. A
        reader that stopped at the body's last byte (a range read to its end) has read it whole: h11 says so
        without more I/O."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._ended = self._ended or conn.answer_complete()
            self._pool.done(self._origin, conn, reuse=self._ended)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class HttpPool:
    """Requests over pooled connections. Use as ``async with``."""

    def __init__(self, ssl_for: SSLFor, timeouts: Timeouts, headers: dict[str, str]):
        self._ssl_for = ssl_for
        self.timeouts = timeouts
        self._headers = headers  # sent with every request
        self._idle: IdleConnections[_Connection] = IdleConnections()

    async def __aenter__(self) -> HttpPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._idle.close()

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        ssl_for: SSLFor | None = None,
    ) -> Response:
        """Send a request and wait for the answer's head (redirects are answers too). ``ssl_for`` overrides the
        pool's choice of TLS for this request."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        context = tls_for(ssl_for or self._ssl_for, url)
        origin = (scheme, host, port, id(context))
        netloc = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = [("Host", netloc), *self._headers.items(), *(headers or {}).items()]
        if body or method == "POST":
            fields.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=fields)
        for attempt in (1, 2):
            conn = self._idle.take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port, netloc, context)
            try:
                status, answer = await self._exchange(conn, request, body)
            except _Stale:
                conn.close()
                if attempt == 2 or not reused or method != "GET":
                    raise ConnectionFailed(f"{netloc}: the server closed the connection before answering") from None
                continue
            except BaseException:
                conn.close()
                raise
            return Response(self, origin, conn, status, answer, url)
        raise AssertionError("unreachable")

    async def _exchange(self, conn: _Connection, request: h11.Request, body: bytes) -> tuple[int, Headers]:
        conn.received = False
        data = conn.h11.send(request) or b""
        if body:
            data += conn.h11.send(h11.Data(data=body)) or b""
        data += conn.h11.send(h11.EndOfMessage()) or b""
        try:
            conn.writer.write(data)
            async with asyncio.timeout(self.timeouts.headers_s):
                await conn.writer.drain()
                while True:
                    event = await conn.next_event(self.timeouts.headers_s)
                    if isinstance(event, h11.Response):
                        return event.status_code, Headers(list(event.headers))
                    if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.InformationalResponse):
                        break
        except TimeoutError:
            raise ConnectionFailed(
                f"{conn.netloc}: timed out waiting {self.timeouts.headers_s:.0f} s for the answer's head"
            ) from None
        except ConnectionFailed:
            if not conn.received:
                raise _Stale from None
            raise
        except OSError as e:
            if not conn.received:
                raise _Stale from None
            raise ConnectionFailed(f"{conn.netloc}: {e.strerror or e}") from None
        raise _Stale

    def done(self, origin: Origin, conn: _Connection, reuse: bool) -> None:
        """A response is over: keep its connection for the next request to ``origin`` if it can serve one (see
        :class:`IdleConnections`), else close it."""
        if reuse and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._idle.keep(origin, conn)
        else:
            conn.close()

    async def _connect(self, host: str, port: int, netloc: str, context: ssl.SSLContext | None) -> _Connection:
        with connect_errors(netloc, tls=context is not None):
            async with asyncio.timeout(self.timeouts.connect_for(host, port)):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if context else None, limit=READ_SIZE
                )
        return _Connection(reader, writer, netloc)

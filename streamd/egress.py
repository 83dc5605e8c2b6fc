"""The one egress policy: every connection the daemon makes for a stream goes through here.

- Host names are resolved once, here; every resolved address is classified (`address_class`: loopback, private,
  link-local, CGNAT, benchmarking, documentation, 6to4, the IPv4-mapped/NAT64 forms of those, anything
  `ipaddress` does not call global) and a non-global one is refused unless the operator's allow-list (`egress.allow`:
  CIDRs, host names, `*.suffix`) names it. The connection is made to the checked address: aiohttp is given a
  resolver that returns only checked addresses, and FFmpeg is given the URL with the host replaced by the checked
  address (`pin_url`), so a second, different answer from DNS (rebinding) never reaches a socket.
- Redirects are followed here, never by aiohttp or FFmpeg: at most `egress.max_redirects`, each hop checked.
- Per-fetch byte and time limits, and a request-rate cap per stream (a token bucket): a self-referencing playlist
  fails fast with a reason that says so instead of hammering its origin.
- Streams from the config file are the operator's: their own host (as written in the URL) stays allowed whatever
  it resolves to (an NVR on a private address serving absolute URLs to itself works); anything else they lead to
  goes through the same checks. Streams added through the API get no such exception.

Refusals raise `EgressError` (a `SourceError` with a `code`) before any connection is attempted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from streamd.errors import SourceError
from streamd.log import get_logger, redact_url

log = get_logger("streamd.egress")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# special-purpose ranges (IANA registries), most specific first when matched; anything not global is refused
_SPECIAL: list[tuple[str, str]] = [
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf-protocol"), ("192.0.2.0/24", "documentation"), ("192.88.99.0/24", "6to4-relay"),
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("100::/64", "discard"), ("2001::/32", "teredo"),
    ("2001:2::/48", "benchmarking"), ("2001:db8::/32", "documentation"), ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"), ("5f00::/16", "segment-routing"), ("64:ff9b:1::/48", "nat64-local"),
    ("fc00::/7", "unique-local"), ("fe80::/10", "link-local"), ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
]
_SPECIAL_NETS = sorted(((ipaddress.ip_network(n), c) for n, c in _SPECIAL), key=lambda x: -x[0].prefixlen)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.ip_network("::/96")  # IPv4-compatible (deprecated, RFC 4291): ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765): ::ffff:0:a.b.c.d


def address_class(ip: IPAddress) -> str | None:
    """None for a global unicast address; else the class that makes it non-global (e.g. "loopback", "cgnat")."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped
        kind = "ipv4-mapped"
        if embedded is None:
            for net, name in ((_NAT64, "nat64"), (_IPV4_TRANSLATED, "ipv4-translated"),
                              (_IPV4_COMPAT, "ipv4-compatible")):
                if ip in net and int(ip) > 1:  # :: and ::1 are themselves (unspecified, loopback)
                    embedded, kind = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), name
                    break
        if embedded is not None:
            inner = address_class(embedded)
            return f"{kind} {inner}" if inner else None
    for net, cls in _SPECIAL_NETS:
        if ip.version == net.version and ip in net:
            return cls
    if not ip.is_global:
        return "non-global"
    return None


class EgressError(SourceError):
    """The policy refused a fetch or a limit was hit; `code` says which (egress_refused, too_large ...)."""

    def __init__(self, message: str, code: str = "egress_refused", *, permanent: bool = False):
        super().__init__(message, permanent=permanent, code=code)


@dataclass(frozen=True)
class EgressRules:
    """What the policy allows, from `egress:` in the config."""

    deny_non_global: bool = True
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()  # exact names, or ".suffix" for "*.suffix"
    max_redirects: int = 5
    connect_timeout_s: float = 10.0
    requests_per_s: float = 20.0
    request_burst: int = 40

    @classmethod
    def from_config(cls, cfg: Any) -> "EgressRules":
        nets, hosts = [], []
        for item in cfg.allow:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.append(item.lower().lstrip("*"))
        return cls(cfg.deny_non_global, tuple(nets), tuple(hosts), cfg.max_redirects, cfg.connect_timeout_s,
                   cfg.requests_per_s, cfg.request_burst)

    def host_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return any(h == a or (a.startswith(".") and h.endswith(a)) for a in self.allow_hosts)

    def ip_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.allow_networks)


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


@dataclass
class _Bucket:
    rate: float
    burst: int
    tokens: float = 0.0
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class StreamEgress:
    """The policy as one stream sees it: its trusted host (config-file streams), its request budget, and an
    aiohttp session whose only resolver is the policy. Made and closed on the event loop."""

    def __init__(self, rules: EgressRules, stream_id: str, trusted_host: str | None = None):
        self.rules = rules
        self.stream_id = stream_id
        self.trusted_host = trusted_host.lower().strip("[]") if trusted_host else None
        self.requests = 0  # every HTTP request made (redirect hops included)
        self._bucket = _Bucket(rules.requests_per_s, rules.request_burst)
        self._session: aiohttp.ClientSession | None = None

    # -- checks ---------------------------------------------------------------------------------------------
    def _trusted(self, host: str) -> bool:
        return self.trusted_host is not None and host.lower().strip("[]") == self.trusted_host

    def check_ip(self, ip: IPAddress, host: str) -> None:
        """Raises EgressError when `ip` (an address of `host`) may not be connected to."""
        if not self.rules.deny_non_global or self._trusted(host) or self.rules.host_allowed(host) \
                or self.rules.ip_allowed(ip):
            return
        cls = address_class(ip)
        if cls is not None:
            shown = host if _ip(host) is not None else f"{host} ({ip})"
            raise EgressError(f"egress policy refused {shown}: a {cls} address (allow it with egress.allow)")

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[IPAddress]:
        """Resolve once and check every address; refuses the host when any of them is refused."""
        ip = _ip(host)
        if ip is not None:
            self.check_ip(ip, host)
            return [ip]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise EgressError(f"cannot resolve {host!r}: {getattr(e, 'strerror', None) or e}", "unresolvable") \
                from None
        addrs: list[IPAddress] = []
        for info in infos:
            a = _ip(str(info[4][0]))
            if a is not None and a not in addrs:
                addrs.append(a)
        if not addrs:
            raise EgressError(f"cannot resolve {host!r}: no address", "unresolvable")
        for a in addrs:
            self.check_ip(a, host)
        return addrs

    def take_request(self, url: str) -> None:
        if not self._bucket.take():
            raise EgressError(f"more than {self.rules.requests_per_s:g} requests/s to fetch {redact_url(url)} "
                              "(a playlist that refers to itself?)", "request_rate")
        self.requests += 1

    async def pin_url(self, url: str) -> str:
        """The URL with its host replaced by its checked address, for FFmpeg (which would resolve it again)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # never quote urllib's message: it holds the "port", a piece of a malformed password
            raise EgressError(f"{redact_url(url)} is not a valid URL (a port that is not a number?)",
                              "invalid_reference", permanent=True) from None
        host = parts.hostname or ""
        addrs = await self.resolve(host, port or 0)
        ip = addrs[0]
        if _ip(host) is not None:
            return url
        shown = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = parts.netloc.rsplit("@", 1)
        hostport = shown + (f":{port}" if port else "")
        netloc_new = f"{netloc[0]}@{hostport}" if len(netloc) == 2 else hostport
        return urlunsplit((parts.scheme, netloc_new, parts.path, parts.query, parts.fragment))

    # -- HTTP -----------------------------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(resolver=_PolicyResolver(self), ttl_dns_cache=None,
                                             use_dns_cache=False, limit_per_host=4)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(sock_connect=self.rules.connect_timeout_s))
        return self._session

    async def request(self, url: str, *, timeout_s: float, headers: dict[str, str] | None = None,
                      origin: str | None = None) -> aiohttp.ClientResponse:
        """GET `url`, following at most `max_redirects` redirects, each hop checked before it connects. Returns
        the final response (2xx) for the caller to read and release; raises EgressError otherwise. The credential
        headers among `headers` go only to the scheme/host/port of `origin` (a URL; default: `url` itself): a
        caller that fetches URLs someone else named (a playlist's segments) passes the configured URL."""
        hops = 0
        origin_key = _origin(origin if origin is not None else url)
        deadline = asyncio.get_running_loop().time() + timeout_s  # every hop's response headers, in all
        while True:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError (quoting a piece of a malformed password)
            except ValueError:
                raise EgressError(f"{redact_url(url)} is not a valid URL (a port that is not a number?)",
                                  "invalid_reference", permanent=True) from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise EgressError(f"egress policy refused {redact_url(url)}: only http(s) URLs may be fetched",
                                  permanent=False)
            ip = _ip(parts.hostname)
            if ip is not None:  # aiohttp does not resolve (so does not ask the policy) for address literals
                self.check_ip(ip, parts.hostname)
            self.take_request(url)
            try:
                # the response headers (of every hop) within timeout_s in all: sock_read alone restarts at every
                # byte, so an origin that trickles its headers (or redirects to one that does) held the open for ever
                async with asyncio.timeout_at(deadline):
                    resp = await self.session.get(url, headers=_hop_headers(headers, origin_key, url),
                                                  allow_redirects=False,
                                                  timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                                sock_read=timeout_s))
            except EgressError:
                raise
            except aiohttp.ClientConnectorError as e:
                inner = e.os_error
                if isinstance(inner, EgressError):
                    raise inner from None
                raise EgressError(f"cannot connect to {redact_url(url)}: {inner.strerror or inner}", "unreachable") \
                    from None
            except (asyncio.TimeoutError, TimeoutError):
                raise EgressError(f"no answer from {redact_url(url)} within {timeout_s:g} s", "timeout") from None
            except aiohttp.ClientError as e:
                raise EgressError(f"fetching {redact_url(url)} failed: {type(e).__name__}: {e}", "unreachable") \
                    from None
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.headers.get("Location", "")
                resp.release()
                hops += 1
                if hops > self.rules.max_redirects:
                    raise EgressError(f"more than {self.rules.max_redirects} redirects from {redact_url(url)}",
                                      "too_many_redirects")
                if not location:
                    raise EgressError(f"redirect without a Location from {redact_url(url)}", "http_status")
                url = urljoin(url, location)
                continue
            if resp.status >= 400:
                resp.release()
                raise EgressError(f"HTTP {resp.status} from {redact_url(url)}", "http_status",
                                  permanent=False)
            return resp

    async def fetch(self, url: str, *, max_bytes: int, timeout_s: float, headers: dict[str, str] | None = None,
                    origin: str | None = None) -> tuple[bytes, str]:
        """The whole body of `url` (at most `max_bytes`, within `timeout_s` in all; a bytearray, never copied) and
        the final URL after redirects (relative references in a playlist resolve against it). `origin`: as for
        request()."""
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.request(url, timeout_s=timeout_s, headers=headers, origin=origin)
                try:
                    length = resp.content_length
                    if length is not None and length > max_bytes:
                        raise EgressError(f"{redact_url(url)} is {length} bytes, over the {max_bytes} limit",
                                          "too_large")
                    # read into one buffer, returned as it is (a bytearray, a bytes-like object): never copied, so
                    # a body's peak is its size (a bytearray then bytes() held it twice). Its size is known up front
                    # when the origin says it (Content-Length): allocated once.
                    data = bytearray(length) if length is not None else bytearray()
                    size = 0
                    async for chunk in resp.content.iter_chunked(65536):
                        end = size + len(chunk)
                        if end > max_bytes:
                            raise EgressError(f"{redact_url(url)} is over the {max_bytes}-byte limit", "too_large")
                        if end <= len(data):
                            data[size:end] = chunk
                        else:
                            del data[size:]
                            data += chunk
                        size = end
                    del data[size:]  # a body shorter than its Content-Length (aiohttp raises; kept exact anyway)
                    return data, str(resp.url)
                finally:
                    resp.release()
        except TimeoutError:
            raise EgressError(f"fetching {redact_url(url)} took over {timeout_s:g} s", "timeout") from None
        except aiohttp.ClientError as e:
            raise EgressError(f"fetching {redact_url(url)} failed: {type(e).__name__}: {e}", "unreachable") \
                from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# credentials an operator configures (ffmpeg_options.headers, user_agent/referer are not secrets) go to the URL's own
# origin only: never to another scheme, host or port a redirect names, never over a downgrade to plain http
_PUBLIC_HEADERS = frozenset({"user-agent", "referer", "range", "if-range", "accept", "accept-encoding"})


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    try:
        port = p.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (p.hostname or "").lower(), port


def _hop_headers(headers: dict[str, str] | None, origin: tuple[str, str, int | None], url: str) \
        -> dict[str, str]:
    """The headers sent to one hop: all of them to the first URL's origin, else only the non-credential ones."""
    out = {"Accept-Encoding": "identity"}  # bodies are read as they are (no decompression): never ask for gzip
    if headers:
        if _origin(url) == origin:
            out.update(headers)
        else:
            out.update({k: v for k, v in headers.items() if k.lower() in _PUBLIC_HEADERS})
    return out


class _PolicyResolver(AbstractResolver):
    """aiohttp's only resolver for a stream's session: the policy's own resolution and check."""

    def __init__(self, egress: StreamEgress):
        self._egress = egress

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        addrs = await self._egress.resolve(host, port, family)
        return [ResolveResult(hostname=host, host=str(a), port=port,
                              family=socket.AF_INET6 if a.version == 6 else socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for a in addrs]

    async def close(self) -> None:
        return None

"""Channel security and options for talking to istiod.

istiod's 15012 port serves TLS with its own CA and authenticates the client by an
`authorization: Bearer <service-account JWT>` header read at stream start. Tokens rotate
(kubelet swaps a projected token file well before expiry), so the file is re-read
whenever it changes; the CA bundle is re-read per connection for the same reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

KEEPALIVE_MIN_SECONDS = 15.0  # istiod's enforcement policy sends GOAWAY below this
KEEPALIVE_TIMEOUT_MS = 20_000


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the control plane. No ca_file = the system roots."""

    ca_file: str | None = None
    server_name: str | None = None  # SAN to verify when it differs from the address host
    token_file: str | None = None


class TokenFile:
    """A bearer token file, re-read only when its identity (inode, mtime, size) changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._token = ""

    def read(self) -> str:
        """The current token; raises OSError/ValueError when it is missing or empty."""
        st = os.stat(self.path)  # follows the ..data symlink Kubernetes swaps on rotation
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            with open(self.path, encoding="utf-8") as f:
                token = f.read().strip()
            if not token:
                raise ValueError(f"token file {self.path} is empty")
            self._token, self._key = token, key
        return self._token


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    root = None
    if tls.ca_file:
        with open(tls.ca_file, "rb") as f:
            root = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root)


def call_metadata(token: TokenFile | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token.read()}")] if token else []


def channel_options(
    keepalive_seconds: float, max_receive_bytes: int, server_name: str | None
) -> list[tuple[str, int | str]]:
    opts: list[tuple[str, int | str]] = [
        ("grpc.keepalive_time_ms", int(max(keepalive_seconds, KEEPALIVE_MIN_SECONDS) * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Ping only while the ADS stream exists (it always does while we are connected).
        ("grpc.keepalive_permit_without_calls", 0),
        # An idle ADS stream carries no data for hours; keep pinging so a dead peer is noticed.
        ("grpc.http2.max_pings_without_data", 0),
        # A large mesh's CDS/RDS is tens of MB; the 4 MiB default would break the stream.
        ("grpc.max_receive_message_length", max_receive_bytes if max_receive_bytes > 0 else -1),
        # We retry and back off ourselves, with subscription state the channel knows nothing of.
        ("grpc.enable_retries", 0),
        ("grpc.primary_user_agent", "amesh-xds"),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts

"""The workload certificate for ISTIO_MUTUAL upstreams, as an APISIX client SSL object.

istio-agent writes cert-chain.pem and key.pem (paths: translate.istio_cert_paths). APISIX
wants PEM text, not paths; one `/ssls/<id>` object that every ISTIO_MUTUAL upstream names
(tls.client_cert_id) means a rotation rewrites one key, not every upstream.
"""

from __future__ import annotations

import os
from typing import Any

ISTIO_CLIENT_SSL_ID = "amesh-istio-client"
SSL_KEY = f"/ssls/{ISTIO_CLIENT_SSL_ID}"


class IstioCertFiles:
    """Reads the two files when they change (by mtime, size and inode)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._cert, self._key = paths["cert_chain"], paths["key"]
        self._signature: tuple[Any, ...] | None = None
        self.error = ""

    def _stat(self) -> tuple[Any, ...] | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino)
                         for s in (os.stat(self._cert), os.stat(self._key)))
        except OSError:
            return None

    def changed(self) -> bool:
        return self._stat() != self._signature

    def load(self) -> dict[str, Any] | None:
        """The SSL object, or None while the files are missing or unreadable."""
        self._signature = self._stat()
        try:
            with open(self._cert, encoding="ascii") as f:
                cert = f.read()
            with open(self._key, encoding="ascii") as f:
                key = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            self.error = f"istio workload certificate not loaded: {exc}"
            return None
        if "BEGIN CERTIFICATE" not in cert or "PRIVATE KEY" not in key:
            self.error = f"istio workload certificate: {self._cert} or {self._key} is not PEM"
            return None
        self.error = ""
        return {"id": ISTIO_CLIENT_SSL_ID, "type": "client", "cert": cert, "key": key}

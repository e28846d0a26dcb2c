"""A stand-in for istio-agent's SDS: serves one self-signed certificate under every
secret name Envoy asks for (`default`, `ROOTCA`, `file-cert:...`, `file-root:...`).

Without it, a cluster whose TLS context uses Istio's SDS (ISTIO_MUTUAL: initial fetch
timeout 0 = forever) never warms, and Envoy never asks for listeners. The certificate is
made by the openssl CLI; nothing here verifies anything.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def self_signed(workdir: Path) -> tuple[str, str]:
    """(certificate PEM, key PEM) for CN=amesh-test, EC P-256, one day."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=amesh-test", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return cert.read_text(), key.read_text()


class SdsServer:
    """``SdsServer(workdir).start()``; ``address`` is ``127.0.0.1:<port>``; ``stop()``."""

    def __init__(self, workdir: Path) -> None:
        self.cert, self.key = self_signed(Path(workdir))
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _secret(self, name: str):
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

        secret = secret_pb2.Secret(name=name)
        if name == "ROOTCA" or name.startswith("file-root:"):
            secret.validation_context.trusted_ca.inline_string = self.cert
        else:
            secret.tls_certificate.certificate_chain.inline_string = self.cert
            secret.tls_certificate.private_key.inline_string = self.key
        return secret

    def stream_secrets(self, requests):
        """SotW SDS: each request naming new secrets gets every secret served so far."""
        from envoy.service.discovery.v3 import discovery_pb2
        from google.protobuf import any_pb2

        served: set[str] = set()
        for req in requests:
            names = set(req.resource_names)
            if not names or names <= served:
                continue  # an ACK, or nothing new
            served |= names
            resources = []
            for name in sorted(served):
                packed = any_pb2.Any()
                packed.Pack(self._secret(name))
                resources.append(packed)
            yield discovery_pb2.DiscoveryResponse(
                version_info=str(len(served)), nonce=str(len(served)), type_url=SECRET,
                resources=resources)

    def start(self) -> SdsServer:
        from envoy.service.secret.v3 import sds_pb2_grpc

        server = grpc.server(ThreadPoolExecutor(max_workers=8))
        outer = self

        class Servicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
            def StreamSecrets(self, requests, context):  # the gRPC method name
                return outer.stream_secrets(requests)

        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(Servicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> SdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Translation settings; the defaults are what an Istio mesh on APISIX expects."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

# nginx has no infinite proxy timeout; Envoy's `timeout: 0` (Istio's default) becomes this.
# A day outlives any sane request while still releasing a connection that is truly stuck.
INFINITE_TIMEOUT_S = 86400.0


@dataclass(frozen=True)
class TranslateOptions:
    # APISIX var compared with a route config's listener port (string compare); None disables.
    port_match_var: str | None = "server_port"
    # Where istio-agent writes cert-chain.pem, key.pem and root-cert.pem.
    istio_cert_dir: str = "/etc/certs"
    istio_cert_chain_file: str = "cert-chain.pem"
    istio_key_file: str = "key.pem"
    istio_root_cert_file: str = "root-cert.pem"
    # APISIX wants the PEM *contents* in upstream `tls` (never a path), and the translator
    # does no I/O: the agent reads istio_cert_paths() and passes the PEM text here.
    istio_client_cert_pem: str | None = None
    istio_client_key_pem: str | None = None
    # Alternatively the id of an APISIX `/ssls/<id>` object of type "client" that the agent
    # maintains; preferred, as a certificate rotation then rewrites one key, not every upstream.
    istio_client_cert_id: str | None = None
    # Substitute for Envoy's infinite (0) timeouts, seconds.
    infinite_timeout: float = INFINITE_TIMEOUT_S
    # A route's `timeout` replaces the upstream's in APISIX, connect included, but the route
    # does not know its cluster's connect_timeout: use Istio's meshConfig.connectTimeout.
    route_connect_timeout: float = 10.0
    # Envoy's default route timeout when `timeout` is unset.
    default_route_timeout: float = 15.0
    # Upstream `retries`: Envoy keeps retries on routes, APISIX on upstreams; Istio's default
    # is 2 attempts. None leaves APISIX's default (number of nodes - 1).
    upstream_retries: int | None = 2
    # Candidate clusters for `cluster_header` routes (APISIX needs them spelled out).
    cluster_header_clusters: tuple[str, ...] = ()
    # Istio enables WebSocket upgrades on every HTTP connection manager.
    enable_websocket: bool = True
    # APISIX speaks HTTP/2 to upstreams only through grpc_pass: treat HTTP/2 clusters as
    # gRPC (scheme grpc/grpcs). False keeps them HTTP/1.1 (with a Skip).
    http2_as_grpc: bool = True
    # send/read timeouts of upstreams (used by stream routes; HTTP routes set their own):
    # Envoy's tcp_proxy idle timeout defaults to one hour.
    upstream_idle_timeout: float = 3600.0
    # Istio's inbound clusters (`inbound|<port>||`) are ORIGINAL_DST: the original
    # destination is the local workload, which APISIX reaches here; None: no nodes.
    inbound_original_dst_host: str | None = "127.0.0.1"
    # Envoy's direct_response body limit when the route config does not set one.
    default_max_direct_response_body: int = 4096


def istio_cert_paths(options: TranslateOptions) -> dict[str, str]:
    """The files the agent must read for ISTIO_MUTUAL upstreams (SDS `default`, `ROOTCA`)."""
    d = options.istio_cert_dir
    return {
        "cert_chain": posixpath.join(d, options.istio_cert_chain_file),
        "key": posixpath.join(d, options.istio_key_file),
        "root_cert": posixpath.join(d, options.istio_root_cert_file),
    }

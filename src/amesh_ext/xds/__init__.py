"""The xDS protocol as an Istio sidecar speaks it (ADS v3, Delta and state-of-the-world).

Knows nothing of APISIX: it feeds `Resource` records to a `ResourceHandler` and ACKs or
NACKs with what the handler answers. Entry point: `client.XdsClient`.
"""

"""amesh: Apache APISIX as an Istio data plane (the agent embedded in libamesh.so).

Data flow: sources (file://, grpc:// ADS) -> agent -> translate -> sink -> native queue.
Importing this package is cheap: heavy modules (grpc, Envoy protos) load on first use.
"""

__version__ = "0.1.0"

"""Real test peers for amesh: istiod (built from the pinned istio module) and upstream Envoy.

``istiod.Istiod`` and ``envoy.EnvoyPeer`` run real processes on free loopback ports;
``mesh/`` holds Istio config corpora; ``dump_xds`` is a minimal ADS probe and golden dumper.
"""

import os

# Benchmarks import the peers too: the same guard as tests/conftest.py (before grpc loads).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

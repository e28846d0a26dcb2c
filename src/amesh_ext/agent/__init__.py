"""The agent: the mesh's Envoy resources in, the dict's changes out.

- `agent.py`: `Agent`, the ResourceHandler the sources feed; keeps the resources and their
  joins (references.py), re-translates only the units a change touches, hands the sink
  what changed; its status.
- `keys.py`: which unit owns each dict key; collisions and their contenders.
- `first_sync.py`: the gate before the first (FULL) batch.
- `route_pieces.py`: route configurations translated virtual host by virtual host, reusing
  what did not change.
The threads that run it are in ../runtime.py."""

from .agent import Agent, ObjectTooLarge

__all__ = ["Agent", "ObjectTooLarge"]

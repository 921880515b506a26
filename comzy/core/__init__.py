"""The routing core: protocol, sessions, registry, hooks and the three listeners."""

"""The swarm processor."""

"""Live telemetry over MQTT: the optional ``telemetry`` worker (``[telemetry]``).

The orchestrator forwards every ``sample`` and ``alert`` event to this worker as a command, with the
event's time (the measurement's UTC time). :mod:`.worker` queues each one durably
(:mod:`.buffer`) and publishes it with paho-mqtt (MQTT v5, QoS 1, a persistent session) in the
layout of :mod:`.messages`; an entry leaves the queue only on the broker's PUBACK. Bundles stay the
record of truth: this is the live view, delivered at least once, in order, with original timestamps.
"""

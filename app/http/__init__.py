"""The HTTP edge every role serves: /metrics and health probes."""

"""The HTTP edge every role serves: a Starlette app (/metrics, /healthz, /readyz) on Hypercorn."""

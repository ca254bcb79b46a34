"""The stores on Redis/Valkey (redis-py's asyncio client), and the embedded redis-server."""

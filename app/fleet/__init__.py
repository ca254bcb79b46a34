"""Records that cross tiers: what a worker reports (PodInfo), a fleet job, and job states.

Plain msgspec Structs and enums with their one wire mapping; no I/O.
"""

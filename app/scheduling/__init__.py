"""Scheduling, shared by the worker and the trigger tier: cron, triggers, decisions, the manager.

`cron` and `triggers` say when; `decisions.decide()` says what to do with the ticks that are due
(pure, no I/O); `schedule_manager.ScheduleManager` is the async shell that sleeps and starts runs.
Imports anyio and msgspec only; a test checks it.
"""

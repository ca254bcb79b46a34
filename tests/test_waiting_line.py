"""WaitingLine (app/core/waiting_line.py), on asyncio and trio."""

from __future__ import annotations

import anyio
import pytest

from app.core.waiting_line import WaitingLine

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_freed_slot_wakes_one_waiter_by_priority_then_arrival() -> None:
    line: WaitingLine[str] = WaitingLine()
    woken: list[str] = []

    async def wait(name: str, priority: int, what: str) -> None:
        with line.place(priority, what) as event:
            await event.wait()
        woken.append(name)

    async with anyio.create_task_group() as tg:
        for name, priority, what in [("a", 0, "echo"), ("b", 0, "echo"), ("c", 5, "echo"),
                                     ("d", 9, "gpu")]:  # fmt: skip
            tg.start_soon(wait, name, priority, what)
            await anyio.wait_all_tasks_blocked()
        assert len(line) == 4
        assert line.wake_first(lambda what: what == "echo")  # d (9) does not fit: c (5) goes
        await anyio.wait_all_tasks_blocked()
        assert woken == ["c"]
        assert len(line) == 3
        assert line.wake_first(lambda what: what == "echo")
        await anyio.wait_all_tasks_blocked()
        assert woken == ["c", "a"]  # first come among equals
        assert not line.wake_first(lambda what: what == "cpu")  # nobody fits: nobody woken
        line.wake_all()
    assert sorted(woken[2:]) == ["b", "d"]
    assert len(line) == 0


async def test_a_waiter_put_at_the_front_keeps_its_turn_and_leaving_leaves_the_line() -> None:
    line: WaitingLine[str] = WaitingLine()
    with line.place(0, "x"), line.place(0, "y") as second, line.place(0, "z", front=True) as z:
        assert line.wake_first(lambda what: True)
        assert z.is_set()
        assert not second.is_set()
        assert line.wake_first(lambda what: True)  # a woken one is passed over
    assert len(line) == 0
    assert not line.wake_first(lambda what: True)

"""Deadlines on one ticking timer: never early, cancelled ones never fire, and asyncio.timeout's behaviour
(per block: Expiry; per wait of a series: Watchdog)."""
import asyncio

import pytest

from router.forwarding.deadlines import Deadlines, Expiry, Watchdog


async def test_deadlines_fire_in_order_never_early_and_cancelled_ones_never():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines.of(loop)
    assert Deadlines.of(loop) is deadlines
    fired: list[tuple[str, float, float]] = []
    start = loop.time()
    scheduled = {}
    for name, delay in (("late", 0.06), ("early", 0.02), ("dropped", 0.01)):
        when = start + delay
        scheduled[name] = deadlines.at(when, lambda n=name, w=when: fired.append((n, w, loop.time())))
    scheduled["dropped"].cancel()
    await asyncio.sleep(0.15)
    assert [name for name, _, _ in fired] == ["early", "late"]
    assert all(at >= when for _, when, at in fired)
    assert deadlines.live == 0 and not deadlines._heap   # nothing pending: the timer stops


async def test_cancelled_long_deadlines_do_not_pile_up():
    deadlines = Deadlines.of(asyncio.get_running_loop())
    keep = deadlines.after(0.2, lambda: None)
    for _ in range(5000):   # requests whose 600 s timeouts end at once
        deadlines.after(600.0, lambda: None).cancel()
    await asyncio.sleep(0.03)
    assert len(deadlines._heap) <= 1024 + 1 and deadlines.live == 1
    keep.cancel()


async def test_expiry_raises_timeout_error_like_asyncio_timeout():
    with pytest.raises(TimeoutError):
        with Expiry(0.02):
            await asyncio.sleep(5)
    with Expiry(1.0) as expiry:   # ends in time: nothing raised, nothing left pending
        await asyncio.sleep(0)
    assert expiry.when is not None


async def test_expire_now_cuts_a_wait_short_from_another_task():
    async def wait() -> str:
        try:
            with Expiry(30.0) as expiry:
                holder.append(expiry)
                await asyncio.sleep(30)
        except TimeoutError:
            return "timed out"
        return "finished"

    holder: list[Expiry] = []
    task = asyncio.ensure_future(wait())
    await asyncio.sleep(0.01)
    holder[0].expire_now()
    holder[0].expire_now()   # twice: still one cancellation
    assert await asyncio.wait_for(task, 5) == "timed out"


async def test_a_cancellation_from_outside_is_not_turned_into_a_timeout():
    async def wait() -> None:
        with Expiry(30.0):
            await asyncio.sleep(30)

    task = asyncio.ensure_future(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_deadline_cancelled_before_the_next_tick_never_enters_the_heap():
    deadlines = Deadlines.of(asyncio.get_running_loop())
    keep = deadlines.after(0.2, lambda: None)
    deadlines.after(0.1, lambda: None).cancel()   # a worker answered at once
    await asyncio.sleep(0.03)
    assert [entry[2] for entry in deadlines._heap] == [keep] and deadlines.live == 1
    keep.cancel()


async def test_a_watchdog_bounds_each_wait_not_their_sum():
    watch = Watchdog(0.05)
    for _ in range(6):   # 0.12 s in all, 0.02 s a wait: none overdue
        with watch:
            await asyncio.sleep(0.02)
    with pytest.raises(TimeoutError):
        with watch:
            await asyncio.sleep(5)
    with watch:   # and it goes on bounding the next waits
        await asyncio.sleep(0)
    watch.close()
    assert Deadlines.of(asyncio.get_running_loop()).live == 0


async def _a_short_wait_then_a_long_one(watch: Watchdog, between=lambda: None) -> str:
    with watch:
        await asyncio.sleep(0)
    between()
    try:
        with watch:
            await asyncio.sleep(30)
    except TimeoutError:
        return "timed out"
    return "finished"


async def test_a_watchdog_keeps_a_shorter_bound_set_after_a_longer_one():
    watch = Watchdog(30.0)

    def idle_bound() -> None:   # a stream's idle bound, after its first-byte one
        watch.seconds = 0.05

    assert await asyncio.wait_for(_a_short_wait_then_a_long_one(watch, idle_bound), 5) == "timed out"


async def test_a_watchdogs_expire_now_cuts_the_current_wait_only():
    watch = Watchdog(30.0)
    watch.expire_now()   # between waits: nothing to cut (the short wait after it is unaffected)
    task = asyncio.ensure_future(_a_short_wait_then_a_long_one(watch))
    await asyncio.sleep(0.01)
    watch.expire_now()
    watch.expire_now()   # twice: still one cancellation
    assert await asyncio.wait_for(task, 5) == "timed out"
    watch.close()

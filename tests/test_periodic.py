"""comzy.Periodic: the one background-refresh loop plugins use (auth_token, custom_domains)."""

from __future__ import annotations

import anyio
import pytest

from comzy import Periodic

pytestmark = pytest.mark.anyio


async def test_runs_again_and_again_until_stopped() -> None:
    runs = 0
    third = anyio.Event()

    async def job() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            third.set()

    async with anyio.create_task_group() as tg:
        periodic = Periodic(job, 0.001)
        periodic.start(tg)
        with anyio.fail_after(5):
            await third.wait()
        await periodic.stop()
        stopped_at = runs
        await anyio.sleep(0.02)  # twenty periods: a stopped loop would have run again by now
    assert stopped_at >= 3
    assert runs == stopped_at


async def test_stop_waits_for_the_run_in_progress_and_never_cancels_it() -> None:
    started, release = anyio.Event(), anyio.Event()
    finished = False

    async def job() -> None:
        nonlocal finished
        started.set()
        await release.wait()  # a query in flight
        finished = True

    async with anyio.create_task_group() as tg:
        periodic = Periodic(job, 0.001)
        periodic.start(tg)
        with anyio.fail_after(5):
            await started.wait()
        stopping = anyio.Event()

        async def stop() -> None:
            await periodic.stop()
            stopping.set()

        tg.start_soon(stop)
        await anyio.sleep(0.01)
        assert not stopping.is_set(), "stop() returned while the run was still in progress"
        release.set()
        with anyio.fail_after(5):
            await stopping.wait()
    assert finished


async def test_stop_before_start_is_a_no_op_and_start_twice_is_refused() -> None:
    async def job() -> None:
        return None

    periodic = Periodic(job, 1)
    await periodic.stop()
    async with anyio.create_task_group() as tg:
        periodic.start(tg)
        with pytest.raises(RuntimeError, match="already been started"):
            periodic.start(tg)
        await periodic.stop()


def test_the_period_must_be_positive() -> None:
    async def job() -> None:
        return None

    with pytest.raises(ValueError, match="positive"):
        Periodic(job, 0)

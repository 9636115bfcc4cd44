"""The BLAS thread keeper's decisions (engine/blas_threads.py), on made-up CPU readings."""

from __future__ import annotations

import pytest

from trioserve.engine.blas_threads import (
    AUTO,
    BlasThreads,
    fitting_threads,
    read_cpu_seconds,
    usable_cores,
)


class Machine:
    """A clock and /proc readings that advance by what the test says others and we use."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy_s = 0.0
        self.own_s = 0.0
        self.fail = False

    def run(self, seconds: float, others: float, own: float = 1.0) -> None:
        self.now += seconds
        self.busy_s += seconds * (others + own)
        self.own_s += seconds * own

    def read(self) -> tuple[float, float]:
        if self.fail:
            raise OSError("no /proc/stat")
        return self.busy_s, self.own_s


class Recorder:
    def __init__(self) -> None:
        self.log: list[str] = []

    def set(self, n: int) -> None:
        self.log.append(f"set {n}")

    def wait_idle(self) -> None:
        self.log.append("wait")


def keeper(setting, machine: Machine, rec: Recorder, cores: int = 2) -> BlasThreads:
    return BlasThreads(rec.set, setting, cores=cores, read=machine.read, clock=lambda: machine.now)


def steps(k: BlasThreads, machine: Machine, rec: Recorder, n: int, others: float) -> None:
    for _ in range(n):
        k.before_step(rec.wait_idle)
        machine.run(0.25, others)


def test_a_fixed_count_is_set_once_after_the_step_in_flight_ends():
    machine, rec = Machine(), Recorder()
    k = keeper("2", machine, rec)
    steps(k, machine, rec, 20, others=1.0)
    assert rec.log == ["wait", "set 2"]
    assert k.threads == 2 and k.changes == 0


def test_auto_starts_at_one_thread_and_takes_the_second_core_after_a_quiet_spell():
    machine, rec = Machine(), Recorder()
    k = keeper(AUTO, machine, rec)
    steps(k, machine, rec, 1, others=0.0)
    assert rec.log == ["wait", "set 1"] and k.threads == 1
    # A sample every 0.5 s (two steps) after the baseline at 0 s: quiet at 0.5, 1.0, 1.5 s.
    steps(k, machine, rec, 5, others=0.05)
    assert k.threads == 1
    steps(k, machine, rec, 1, others=0.05)
    assert k.threads == 2 and k.changes == 1
    assert rec.log[-2:] == ["wait", "set 2"]


def test_auto_gives_the_core_back_at_the_first_busy_sample():
    machine, rec = Machine(), Recorder()
    k = keeper(AUTO, machine, rec)
    steps(k, machine, rec, 10, others=0.0)
    assert k.threads == 2
    steps(k, machine, rec, 3, others=0.9)
    assert k.threads == 1 and k.changes == 2
    assert k.others == pytest.approx(0.9)


def test_a_neighbour_between_the_margins_changes_nothing():
    machine, rec = Machine(), Recorder()
    k = keeper(AUTO, machine, rec)
    steps(k, machine, rec, 20, others=0.2)  # above the rise margin: stays at one
    assert k.threads == 1
    steps(k, machine, rec, 10, others=0.0)
    assert k.threads == 2
    steps(k, machine, rec, 20, others=0.2)  # under the drop margin: stays at two
    assert k.threads == 2 and k.changes == 1


def test_one_quiet_sample_among_busy_ones_does_not_take_the_core():
    machine, rec = Machine(), Recorder()
    k = keeper(AUTO, machine, rec)
    for _ in range(5):
        steps(k, machine, rec, 4, others=0.0)
        steps(k, machine, rec, 2, others=0.8)
    assert k.threads == 1 and k.changes == 0


def test_an_idle_spell_counts_as_one_sample_of_what_others_used_meanwhile():
    machine, rec = Machine(), Recorder()
    k = keeper(AUTO, machine, rec)
    steps(k, machine, rec, 10, others=0.0)
    assert k.threads == 2
    machine.run(30.0, others=1.0, own=0.0)  # idle while something else ran
    steps(k, machine, rec, 1, others=1.0)
    assert k.threads == 1


def test_unreadable_cpu_figures_leave_the_count_alone():
    machine, rec = Machine(), Recorder()
    k = keeper(AUTO, machine, rec)
    machine.fail = True
    steps(k, machine, rec, 20, others=0.0)
    assert k.threads == 1 and rec.log == ["wait", "set 1"]


@pytest.mark.parametrize(
    ("others", "cores", "margin", "threads"),
    [
        (0.0, 2, 0.3, 2),
        (0.29, 2, 0.3, 2),
        (0.31, 2, 0.3, 1),
        (1.7, 2, 0.3, 1),
        (1.5, 4, 0.3, 2),
        (0.0, 1, 0.3, 1),
        (3.9, 4, 0.15, 1),
        (0.1, 8, 0.15, 8),
    ],
)
def test_fitting_threads(others, cores, margin, threads):
    assert fitting_threads(others, cores, margin) == threads


def test_the_real_readings_are_sane():
    assert usable_cores() >= 1
    busy0, own0 = read_cpu_seconds()
    sum(i * i for i in range(300_000))  # some CPU of our own
    busy1, own1 = read_cpu_seconds()
    assert busy1 >= busy0 and own1 > own0


@pytest.mark.parametrize(
    ("values", "user_env", "setting"),
    [
        ({}, None, AUTO),  # the default: auto
        ({}, "2", None),  # the user's OPENBLAS_NUM_THREADS stays as OpenBLAS read it
        ({"blas_threads": "3"}, "2", "3"),  # the flag wins
        ({"blas_threads": "1"}, None, "1"),
        ({"models": ("a=/m/a", "b=/m/b"), "max_loaded_models": 2}, None, 1),
        ({"models": ("a=/m/a", "b=/m/b"), "max_loaded_models": 1}, None, AUTO),
    ],
)
def test_the_servers_setting(monkeypatch, values, user_env, setting):
    from trioserve.api import app
    from trioserve.config import ServerConfig

    monkeypatch.setattr(app, "user_thread_count", lambda: user_env)
    assert app._blas_threads(ServerConfig(**values)) == setting

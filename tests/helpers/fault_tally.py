"""Counts of injected faults and hostile inputs, summed over the run (xdist workers included).

Tests take the `tally` fixture; the line printed at the end reads
`faults: N injected, N survived, 0 steps lost; bad inputs: M tried, M handled`.
"""

import contextlib

import pytest

KEY = "fault_tally"
FIELDS = ("injected", "survived", "lost", "tried", "handled", "restarts", "resumed")


class Tally:
    def __init__(self):
        self.counts = dict.fromkeys(FIELDS, 0)
        self.figures: dict[str, float] = {}

    @contextlib.contextmanager
    def fault(self):
        """One injected fault; it counts as survived if the block (its checks) passes."""
        self.counts["injected"] += 1
        yield
        self.counts["survived"] += 1

    @contextlib.contextmanager
    def bad_input(self):
        """One hostile input; it counts as handled if the block (its checks) passes."""
        self.counts["tried"] += 1
        yield
        self.counts["handled"] += 1

    def lost(self, steps: int) -> None:
        """Steps of completed, checkpointed work that a restart did not get back."""
        self.counts["lost"] += steps

    def restart(self, start: int) -> None:
        """A training process of a fault test started, at step `start` (> 0: resumed)."""
        self.counts["restarts"] += 1
        self.counts["resumed"] += start > 0

    def figure(self, name: str, value: float) -> None:
        """A measurement for the summary (the largest seen across tests is shown)."""
        self.figures[name] = max(value, self.figures.get(name, value))


@pytest.fixture
def tally(request):
    t = Tally()
    yield t
    # user_properties travel with the test reports, also from xdist workers to the controller.
    request.node.user_properties.append((KEY, {"counts": t.counts, "figures": t.figures}))


_total = Tally()


def pytest_runtest_logreport(report):
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == KEY:
            for field, n in value["counts"].items():
                _total.counts[field] += n
            for figure, x in value["figures"].items():
                _total.figure(figure, x)


def pytest_terminal_summary(terminalreporter):
    c = _total.counts
    if not c["injected"] and not c["tried"]:
        return
    terminalreporter.write_line(
        f"faults: {c['injected']} injected, {c['survived']} survived, {c['lost']} steps lost;"
        f" bad inputs: {c['tried']} tried, {c['handled']} handled"
    )
    shown = [f"training starts {c['restarts']} ({c['resumed']} resumed from a checkpoint)"]
    shown += [f"{k} {v:.1f}" for k, v in sorted(_total.figures.items())]
    terminalreporter.write_line("fault figures (worst case): " + ", ".join(shown))

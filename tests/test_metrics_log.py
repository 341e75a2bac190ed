"""Log records written while the progress bar is shown get a line of their own."""

import logging
import re
import sys

import pytest
from absl import logging as absl_logging

from dino_jax.metrics_log import MetricLogger


def shown_line(out: str, message: str) -> str:
    """The line holding `message` as a terminal shows it: a carriage return rewinds it."""
    at = out.index(message)
    start = max(out.rfind("\n", 0, at), out.rfind("\r", 0, at)) + 1
    return out[start:].split("\n", 1)[0]


def start_bar(tmp_path) -> MetricLogger:
    # tqdm draws the bar when it is made; later updates may wait for its mininterval.
    return MetricLogger(
        str(tmp_path), total_steps=10, start_step=0, images_per_step=4, log_every=100
    )


@pytest.fixture
def root_at_info():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.setLevel(logging.INFO)
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_python_log_line_starts_below_the_bar(tmp_path, capsys, root_at_info):
    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr, as basicConfig would
    root_at_info.addHandler(handler)
    logger = start_bar(tmp_path)
    logging.getLogger("dino_jax.somewhere").info("a message from the trainer")
    logger.train(4, {"train/loss": 1.25})
    logger.close()
    out = capsys.readouterr().err
    assert "0/10" in out.split("a message from the trainer")[0]  # the bar came first
    assert shown_line(out, "a message from the trainer") == "a message from the trainer"
    after = out.split("a message from the trainer\n", 1)[1]
    assert "0/10" in after and "4/10" in after  # redrawn below, and still moving
    # Closed: the handler is as it was, writing straight to its stream.
    assert "emit" not in vars(handler)
    logging.getLogger("dino_jax.somewhere").info("after close")
    assert capsys.readouterr().err == "after close\n"


def test_absl_log_line_starts_below_the_bar_and_keeps_its_filters(tmp_path, capsys, root_at_info):
    handler = absl_logging.get_absl_handler()
    root_at_info.addHandler(handler)

    def drop(record):
        return "dropped" not in record.getMessage()

    handler.addFilter(drop)  # as train.py does for Orbax's INFO records
    try:
        # absl's first record before flag parsing comes with a warning line of its own,
        # which would put the next line at a line start anyway.
        absl_logging.info("before the bar")
        capsys.readouterr()
        logger = start_bar(tmp_path)
        absl_logging.info("a line from absl")
        absl_logging.info("dropped by the handler's filter")
        logger.close()
    finally:
        handler.removeFilter(drop)
    out = capsys.readouterr().err
    assert re.fullmatch(
        r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] a line from absl", shown_line(out, "a line from absl")
    )
    assert "dropped" not in out
    assert "emit" not in vars(handler) and "emit" not in vars(handler.python_handler)


def test_no_bar_leaves_the_handlers_alone(tmp_path, root_at_info):
    handler = logging.StreamHandler(sys.stderr)
    root_at_info.addHandler(handler)
    logger = MetricLogger(
        str(tmp_path),
        total_steps=10,
        start_step=0,
        images_per_step=4,
        log_every=1,
        progress_bar=False,
    )
    assert "emit" not in vars(handler)
    logger.close()

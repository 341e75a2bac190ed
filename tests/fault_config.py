"""The tiny test configuration as a recipe file for train.py: `--config=tests/fault_config.py`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny import tiny_config


def get_config():
    return tiny_config()

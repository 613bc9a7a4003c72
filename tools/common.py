"""What the tools share: the check of a file a tool is to write (tools/bench.py, tools/plot.py),
and the percentile their latency tables report (tools/bench, tools/load.py)."""
import math
import os

from training.settings import ConfigError


def check_output_file(name, path):
    """The file setting name says to write can be written: its folder exists and takes files.
    Checked at the start, so that a typo does not cost a whole benchmark or plot first."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{name}: cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{name}: cannot write {path}: "
                          + ("it is a folder" if os.path.isdir(path) else "permission denied"))


def percentile(values, p):
    """The p-th percentile by nearest rank: the smallest value that at least p% of values do
    not exceed, always one of the values (no interpolation). None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]

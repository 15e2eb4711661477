"""The one exception type of the data layer."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file and the problem (the CLI prints it and exits 2)."""

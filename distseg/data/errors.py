"""The one exception type of the data layer."""
from __future__ import annotations

import re

from distseg.errors import UserError

_FROM_WORKER = re.compile(r"^Caught \w+ (in DataLoader worker process \d+)\.\nOriginal Traceback")


class DataError(UserError, ValueError):
    """Bad input data: the message names the file and the problem (the CLI prints it and exits 2).

    Raised inside a DataLoader worker, torch re-raises it in the main process as ``DataError(text)`` where ``text``
    is "Caught DataError in DataLoader worker process N." plus the worker's whole traceback; the original one-line
    message is recovered from that traceback's last line, so the report stays one line.
    """

    def __init__(self, message: str = "") -> None:
        match = _FROM_WORKER.match(message) if isinstance(message, str) else None
        if match:
            last = message.rstrip().splitlines()[-1]
            original = last.split("DataError: ", 1)[1] if "DataError: " in last else last
            message = f"{original} ({match.group(1)})"
        super().__init__(message)

"""The one exception type of inference."""
from __future__ import annotations

from distseg.errors import UserError


class PredictError(UserError, ValueError):
    """Bad prediction input (file, bands, class map, output): the message names the file and the problem.

    The CLI prints it as one line and exits with status 2.
    """

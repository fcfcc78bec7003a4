"""The exception for problems the user can fix: a wrong name, a missing file or folder, a corrupt download.

The command line prints a LungSegError as one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class LungSegError(Exception):
    """A user-facing problem; the message says what is wrong and, where it helps, what to do."""

"""seedance-archiver: copy every finished Seedance video to durable storage before the provider deletes it.

Feeding applications call :func:`track` to hand the daemon a task id (see ``feeding.py``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from seedance_archiver import feeding

track = feeding.track

__all__ = ["__version__", "track"]

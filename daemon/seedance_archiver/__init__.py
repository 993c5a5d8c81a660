"""seedance-archiver: copy every finished Seedance video to durable storage before the provider deletes it."""

from __future__ import annotations

__version__ = "0.1.0"

"""Alembic migrations of ``video_tasks`` (shipped inside the wheel as ``seedance_archiver.migrations``)."""

"""Alembic migrations of ``video_tasks`` (shipped inside the wheel as ``daemon.migrations``)."""

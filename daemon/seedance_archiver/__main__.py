from __future__ import annotations

from seedance_archiver import cli

raise SystemExit(cli.main())

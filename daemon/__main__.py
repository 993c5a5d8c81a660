from __future__ import annotations

from daemon import cli

raise SystemExit(cli.main())

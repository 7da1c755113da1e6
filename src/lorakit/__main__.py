"""``python -m lorakit ...`` is the ``lorakit`` command."""

from __future__ import annotations

from .app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

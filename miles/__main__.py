"""``python -m miles`` is the same as the ``miles`` command."""

from miles.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

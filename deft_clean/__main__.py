"""The ``deft-clean`` command's entry point (also ``python -m deft_clean``).

It answers ``--version`` without importing the command line (typer, torch: seconds), and turns a Ctrl-C
while those load into one line and exit code 130 instead of a long traceback; the commands
themselves handle Ctrl-C in ``cli``.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``deft-clean`` command line."""
    if sys.argv[1:] == ["--version"]:
        from deft_clean.version import __version__

        print(f"deft-clean {__version__}")
        return
    try:
        from deft_clean.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: stopped by Ctrl-C while starting; nothing was written.\n")
        raise SystemExit(130) from None
    app()


if __name__ == "__main__":
    main()

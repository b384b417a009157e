"""python -m fastaccum: the fastaccum command line (fastaccum.tools.cli)."""
import sys

from fastaccum.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())

import sys

from app.cli import main

# Guarded: benchmarks start worker processes that import this module again (spawn).
if __name__ == "__main__":
    sys.exit(main())

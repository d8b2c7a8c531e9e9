from app.cli import entry

# Guarded: benchmarks start worker processes that import this module again (spawn).
if __name__ == "__main__":
    entry()

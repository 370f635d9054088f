"""`python -m hvfm.data.prepare`: the command that writes tar shards (the work is in `sources.prepare`)."""
from .sources.prepare import main

if __name__ == "__main__":
    main()

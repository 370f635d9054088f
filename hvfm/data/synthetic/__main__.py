"""`python -m hvfm.data.synthetic`: the command line of the built-in corpora (`clips.main`)."""
from .clips import main

if __name__ == "__main__":
    main()

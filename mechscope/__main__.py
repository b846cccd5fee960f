"""`python -m mechscope ...` runs the command line, as `mechscope ...` does."""

from mechscope.cli import main

if __name__ == "__main__":
    main()

"""`python -m loraens ...`: the `loraens` command, for environments without the script on PATH."""

from loraens.cli.main import main

if __name__ == "__main__":
    main()

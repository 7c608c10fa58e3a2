"""`python -m catfast ...` runs the command line, as the `catfast` script does."""

from catfast.cli import main

main()

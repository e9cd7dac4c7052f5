"""`python -m grayagent`: what /usr/local/bin/grayagent runs (see the Makefile's install target)."""

from grayagent.cli import main

main()

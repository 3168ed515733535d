"""``python -m agent`` -> the CLI."""

from agent.cli import main

main()

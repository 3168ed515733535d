"""``python -m model_tools`` -> the CLI."""

from model_tools.cli import main

main()

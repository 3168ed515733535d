"""``python -m fleet_server``: the same CLI as the ``fleet_server`` console script."""

from fleet_server.cli import main

if __name__ == "__main__":
    main()

"""The admin HTTP API (FastAPI): thin routes over :mod:`fleet_server.registry`,
:mod:`fleet_server.deploy` and :mod:`fleet_server.audit`, plus the TUF repository for devices.

Build it with :func:`create_app` (nothing is created at import time). Every route except
``/healthz`` needs ``Authorization: Bearer <token>``; errors are ``{"error", "detail"}`` JSON with
the status code of the :class:`~fleet_server.errors.FleetError` raised.
"""

from fleet_server.api.app import create_app

__all__ = ["create_app"]

"""One router per resource; :data:`ROUTERS` is what ``create_app`` mounts, in order."""

from fleet_server.api.routes import (
    audit,
    deployments,
    devices,
    health,
    models,
    rollouts,
    tokens,
    tuf,
)

__all__ = ["ROUTERS"]

ROUTERS = (health.router, tokens.router, devices.router, models.router, deployments.router,
           rollouts.router, audit.router, tuf.router)

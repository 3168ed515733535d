"""``edgefleet-agent status``: what the data directory says, without the daemon running."""

from __future__ import annotations

import sqlite3
from typing import Any

from agent.config import AgentConfig
from agent.daemon.app import load_provisioning
from agent.errors import StoreError
from agent.updater.records import StateStore
from agent.updater.slots import ModelStore

__all__ = ["read_status"]


def read_status(config: AgentConfig) -> dict[str, Any]:
    """Device, applied sequence, models (current/previous), last update, outbox depth.

    Raises:
        ConfigError: the provisioning file is unusable.
        StoreError: a state file cannot be read.
    """
    prov = load_provisioning(config.provisioning)
    out: dict[str, Any] = {"device_id": prov.device_id, "profile": prov.profile,
                           "applied_sequence": 0, "models": [], "last_update": None,
                           "outbox_depth": 0}
    if not config.data_dir.is_dir():
        return out
    store = StateStore.in_dir(config.data_dir)
    try:
        out["applied_sequence"] = store.applied_sequence()
        rec = store.load()
        if rec is not None:
            out["last_update"] = {"update_id": rec.update_id, "state": str(rec.state),
                                  "last_error": rec.last_error}
    finally:
        store.close()
    models = ModelStore(config.data_dir)
    root = config.data_dir / "models"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.is_dir():
            out["models"].append({"name": entry.name, "current": models.current(entry.name),
                                  "previous": models.previous(entry.name)})
    outbox = config.data_dir / "outbox.db"
    if outbox.exists():
        try:
            conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
            try:
                out["outbox_depth"] = conn.execute(
                    "SELECT count(*) FROM outbox_records").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {outbox}: {exc}") from exc
    return out

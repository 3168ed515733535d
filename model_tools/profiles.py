"""Device profiles for the converter: where they live, and lookup by name.

The schema and the checked parser are in :mod:`agent.protocol.profiles` (shared with the server
and the agent); this module finds the shipped ``device_profiles/`` directory, or another one
named by ``EDGEFLEET_PROFILES``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from agent.protocol.profiles import DeviceProfile, ProfileError, load_profiles
from model_tools.errors import InputError, ProfileNotFound

__all__ = ["DeviceProfile", "all_profiles", "default_profile_dir", "get_profile"]


def default_profile_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$EDGEFLEET_PROFILES`` if set, else the ``device_profiles`` package shipped with us."""
    env = os.environ if environ is None else environ
    if env.get("EDGEFLEET_PROFILES"):
        return Path(env["EDGEFLEET_PROFILES"])
    from device_profiles import PROFILE_DIR

    return PROFILE_DIR


def all_profiles(directory: Path | None = None) -> dict[str, DeviceProfile]:
    """Every profile in ``directory`` (default: :func:`default_profile_dir`).

    Raises:
        InputError: a profile file is malformed (the message names file and field), or the
            directory holds no profiles.
    """
    where = directory or default_profile_dir()
    try:
        found = load_profiles(where)
    except ProfileError as exc:
        raise InputError(str(exc)) from exc
    if not found:
        raise InputError(f"no device profiles in {str(where)!r}: expected one or more *.toml "
                         "files (see device_profiles/ for the format)")
    return found


def get_profile(name: str, directory: Path | None = None) -> DeviceProfile:
    """The profile called ``name``.

    Raises:
        ProfileNotFound: no such profile; the message lists the valid ones.
        InputError: a profile file is malformed.
    """
    profiles = all_profiles(directory)
    if name not in profiles:
        raise ProfileNotFound(
            f"unknown profile {name!r}; valid profiles: {', '.join(sorted(profiles))}")
    return profiles[name]

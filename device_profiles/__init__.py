"""Device profiles: one TOML file per device class (data; schema in model_tools.profiles)."""

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent

__all__ = ["PROFILE_DIR"]

"""Deployments: the pure planner (plan) and its I/O shell (service)."""

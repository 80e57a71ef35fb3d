"""Prefect flows: thin orchestration over show1's functions."""

from show1.config import apply_environment_defaults

# Before Prefect is imported: its temporary server reads the analytics setting at start-up.
apply_environment_defaults()

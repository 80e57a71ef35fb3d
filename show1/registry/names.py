"""Names in the registry: models `<prefix>-<stage>` and the two aliases. Light on purpose: `show1 promote` and
`show1 lineage` import this, not the registration code (which imports torch and diffusers)."""

from __future__ import annotations

from show1.config import Registry

CHALLENGER, CHAMPION = "challenger", "champion"
ALIASES = (CHALLENGER, CHAMPION)


def model_name(registry: Registry, stage: str) -> str:
    """The registered model of `stage`: `<registry.model_prefix>-<stage>`."""
    return f"{registry.model_prefix}-{stage}"

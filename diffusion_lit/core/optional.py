"""Optional dependencies (the extras in pyproject.toml: sd, data, bench), imported where they are used."""

from diffusion_lit.core.errors import UserError


def need(package: str, extra: str = "sd"):
    """Import an optional dependency, or say which extra to install."""
    try:
        return __import__(package)
    except ImportError:
        raise UserError(f"this needs the {package} package: pip install -e \".[{extra}]\"") from None

"""The error every bad input raises: its message names the key (or file) and the fix."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)

"""Where a broker's keys come from (``operator_key``, ``broker_key``): a reference to an
environment variable or a keystore file, never the key itself (the YAML is refused if it
holds anything that looks like one). :func:`~blendsm.broker.resolve_operator_account` turns
a reference into an account when the broker starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blendsm.broker._config_fields import check_keys, env_name, mapping, path_field
from blendsm.errors import ConfigError

__all__ = ["OperatorKeyConfig", "parse_key_config"]


@dataclass(frozen=True, slots=True)
class OperatorKeyConfig:
    """Where the broker operator's private key comes from: exactly one source."""

    env: str | None = None
    """Name of the environment variable holding the hex private key."""
    keystore: Path | None = None
    """Web3 Secret Storage (v3) keystore file, decrypted with ``$password_env``."""
    password_env: str | None = None
    """Name of the environment variable holding the keystore password."""


def parse_key_config(
    value: Any, base: Path | None, what: str = "operator_key"
) -> OperatorKeyConfig | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(
            f"{what}: must be a mapping (env: VAR_NAME, or keystore: path + "
            "password_env: VAR_NAME); keys go in environment variables or keystores"
        )
    data = mapping(value, what)
    check_keys(data, OperatorKeyConfig, what)
    env = env_name(data, "env", what)
    keystore = path_field(data, "keystore", what, base)
    password_env = env_name(data, "password_env", what)
    if (env is None) == (keystore is None):
        raise ConfigError(
            f"{what}: give exactly one of env (variable holding the hex key) "
            "or keystore (with password_env)"
        )
    if keystore is not None and password_env is None:
        raise ConfigError(f"{what}.password_env: required with {what}.keystore")
    if env is not None and password_env is not None:
        raise ConfigError(f"{what}.password_env: only used with {what}.keystore")
    return OperatorKeyConfig(env=env, keystore=keystore, password_env=password_env)

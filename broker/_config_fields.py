"""Typed, bounded reading of one config field or section: the checks every section shares.

Each function reads ``data[name]`` under the dotted ``prefix`` and raises
:class:`~blendsm.errors.ConfigError` with that path first (``payments.credit_messages: must
be >= 1, got 0``), so every section of :mod:`blendsm.broker._config` reports errors alike.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from eth_account.signers.local import LocalAccount

from blendsm.device_sdk import UINT256_MAX, account_from_env, account_from_keystore
from blendsm.errors import ConfigError

__all__ = [
    "KEY_ADVICE",
    "PRIVATE_KEY",
    "amount",
    "check_keys",
    "dotted",
    "env_name",
    "integer",
    "key_account",
    "mapping",
    "path_field",
    "refuse_inline_keys",
    "resolve",
    "seconds",
    "section",
    "type_name",
    "typed",
]

_T = TypeVar("_T")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PRIVATE_KEY = re.compile(r"(?<![0-9A-Za-z])(?:0[xX])?[0-9a-fA-F]{64}(?![0-9A-Za-z])")
"""Anything that looks like a secp256k1 private key (64 hex digits): never in a config."""
KEY_ADVICE = (
    "looks like a private key; never put keys in the config: name an environment "
    "variable (operator_key.env) or a keystore file (operator_key.keystore + password_env)"
)


def dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def refuse_inline_keys(value: Any, where: str) -> None:
    """Refuse any string (key or value) that looks like a private key, anywhere."""
    if isinstance(value, str):
        if PRIVATE_KEY.search(value):
            raise ConfigError(f"{where or 'config'}: {KEY_ADVICE}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = dotted(where, str(key))
            if isinstance(key, str) and PRIVATE_KEY.search(key):
                raise ConfigError(f"{where or 'config'}: a key name {KEY_ADVICE}")
            refuse_inline_keys(item, name)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            refuse_inline_keys(item, f"{where}[{index}]")


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
    return value


def section(data: Mapping[str, Any], name: str, prefix: str = "") -> Mapping[str, Any]:
    """A nested mapping; missing or empty (``name:`` with nothing under it) means defaults."""
    value = data.get(name)
    return {} if value is None else mapping(value, dotted(prefix, name))


def check_keys(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{dotted(prefix, key)}: unknown key{hint}")


def typed(data: Mapping[str, Any], name: str, prefix: str, kind: type[_T], default: _T) -> _T:
    if name not in data:
        return default
    value = data[name]
    # bool is an int subclass: never accept one for the other.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{dotted(prefix, name)}: must be {kind.__name__}, got {type_name(value)} {value!r}"
        )
    return value


def integer(
    data: Mapping[str, Any],
    name: str,
    prefix: str,
    default: int,
    *,
    low: int,
    high: int | None = None,
) -> int:
    value = typed(data, name, prefix, int, default)
    if value < low:
        raise ConfigError(f"{dotted(prefix, name)}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{dotted(prefix, name)}: must be <= {high}, got {value}")
    return value


def seconds(
    data: Mapping[str, Any],
    name: str,
    prefix: str,
    default: float,
    *,
    allow_zero: bool,
    unit: str = "a number of seconds",
) -> float:
    where = dotted(prefix, name)
    if name not in data:
        return default
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: must be {unit}, got {type_name(value)} {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: must be finite, got {value}")
    if allow_zero and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if not allow_zero and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value}")
    return float(value)


def amount(data: Mapping[str, Any], name: str, prefix: str, default: int) -> int:
    """A uint256 amount: an int or a decimal string of digits; floats refused (precision)."""
    where = dotted(prefix, name)
    if name not in data:
        return default
    value = data[name]
    if isinstance(value, float | Decimal):
        raise ConfigError(
            f"{where}: floats lose precision; write the amount in base units as an integer "
            f"or a quoted decimal string (e.g. '1000000000000000000'), got {value!r}"
        )
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if not text.isascii() or not text.isdigit():
            raise ConfigError(
                f"{where}: must be a whole number of base units (digits only), got {value!r}"
            )
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{where}: must be an integer or a decimal string, got {type_name(value)} {value!r}"
        )
    if value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if value > UINT256_MAX:
        raise ConfigError(f"{where}: must fit in uint256 (<= 2**256 - 1), got {value}")
    return value


def path_field(data: Mapping[str, Any], name: str, prefix: str, base: Path | None) -> Path | None:
    where = dotted(prefix, name)
    if data.get(name) is None:
        return None
    value = data[name]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a non-empty path, got {type_name(value)} {value!r}")
    return resolve(Path(value).expanduser(), base)


def resolve(path: Path, base: Path | None) -> Path:
    return path if base is None or path.is_absolute() else base / path


def env_name(data: Mapping[str, Any], name: str, section: str = "operator_key") -> str | None:
    """The environment variable name at ``section.name`` (None if absent); the error names
    that path."""
    where = dotted(section, name)
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ConfigError(
            f"{where}: must be an environment variable name (letters, digits, _), "
            f"got {type_name(value)}; the key itself goes in that variable"
        )
    return value


def key_account(key: Any, what: str) -> LocalAccount | None:
    """The account of a key reference (``env`` or ``keystore`` + ``password_env``), or None."""
    if key is None:
        return None
    if key.env is not None:
        return account_from_env(key.env)
    if key.keystore is None or key.password_env is None:
        raise ConfigError(f"{what}: give env, or keystore with password_env")
    return account_from_keystore(key.keystore, key.password_env)

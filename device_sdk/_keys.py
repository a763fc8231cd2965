"""Loading private keys from an environment variable or an encrypted keystore file.

Keys never come from config files or command-line arguments (they would land in shell
history and process lists): a key is named by the environment variable that holds it,
or by a Web3 Secret Storage (v3) keystore file whose password is in an environment variable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from blendsm.errors import ConfigError

__all__ = ["account_from_env", "account_from_keystore"]


def account_from_env(variable: str) -> LocalAccount:
    """The account whose hex private key (0x-prefixed or not) is in ``$variable``."""
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(
            f"environment variable {variable} is not set (it should hold a private key)"
        )
    try:
        account: LocalAccount = Account.from_key(value.strip())
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"environment variable {variable} does not hold a valid private key"
        ) from exc
    return account


def account_from_keystore(path: str | os.PathLike[str], password_variable: str) -> LocalAccount:
    """The account in keystore ``path``, decrypted with the password in ``$password_variable``."""
    password = os.environ.get(password_variable)
    if password is None:
        raise ConfigError(
            f"environment variable {password_variable} is not set (keystore password)"
        )
    try:
        keyfile = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read keystore {path}: {exc}") from exc
    try:
        key = Account.decrypt(keyfile, password)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"cannot decrypt keystore {path}: wrong password or corrupt file"
        ) from exc
    account: LocalAccount = Account.from_key(key)
    return account

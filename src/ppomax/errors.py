"""Errors a user can act on. The CLI prints them without a traceback (exit code 2)."""

from __future__ import annotations


class UserError(ValueError):
    """Base of every error caused by the user's input: config, data, model paths."""


class ConfigError(UserError):
    """A configuration problem; the message names the key and what is allowed."""


class ModelPathError(UserError):
    """A model or tokenizer path that does not exist or does not hold what is expected."""

"""Errors a user can act on. The CLI prints them without a traceback (exit code 2)."""

from __future__ import annotations


class UserError(ValueError):
    """Base of every error caused by the user's input: config, data, model paths."""


class ConfigError(UserError):
    """A configuration problem; the message names the key and what is allowed."""


class ModelPathError(UserError):
    """A model or tokenizer path that does not exist or does not hold what is expected."""


STOPPED_EXIT_CODE = 75
"""Exit status of a training command stopped by SIGINT/SIGTERM after saving a checkpoint (sysexits' EX_TEMPFAIL:
"try again later", here with ``--resume DIR``). The same for train-sft, train-rm and train-ppo."""


class RunStopped(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving a checkpoint; the message says where and how to resume.

    A KeyboardInterrupt, so that code which catches ``Exception`` does not swallow the stop."""

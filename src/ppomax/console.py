"""Everything ppomax says on the console goes through the ``ppomax`` logger (:func:`console`): ``ppomax: message``
lines on stderr, written with ``tqdm.write`` so that they never tear a progress bar. A command's result (e.g. the
final model directory) is the only thing printed to stdout. Library users may reconfigure or silence the logger
like any other (``logging.getLogger("ppomax")``)."""

from __future__ import annotations

import logging
import sys


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging handler must not raise
            self.handleError(record)


def console() -> logging.Logger:
    """The ``ppomax`` logger, set up on first use: INFO and above, as ``ppomax: message`` on stderr."""
    logger = logging.getLogger("ppomax")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("ppomax: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger

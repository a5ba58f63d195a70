"""What a command shows its user at the terminal, the same for `distill` and for
`python -m promptdistill.serve`: which errors are the user's to fix (shown as one line,
`error: ...`, with exit status 2 and no traceback), and the libraries kept quiet."""

from __future__ import annotations

from .config_errors import ConfigError
from .models import ModelError
from .render import RenderError
from .rundir import StageError

USER_ERRORS = (ConfigError, StageError, ModelError, RenderError)


def quiet_libraries() -> None:
    """Our stages print their own progress; the libraries' loading bars and deprecation
    notices about their own internals are noise to a user."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

"""What every command-line entry point does around its ``main``: the project's own errors
become one line on stderr and exit status 1, without a traceback.

The project's errors (a bad config field, a malformed annotation file, a tampered or
mismatched checkpoint, an unreadable video, a diverged run) carry messages that name the
file or field and the fix; a traceback would only bury them. ``EXO2EGO_TRACEBACK=1`` shows
the traceback too. A ``--config.<field>=...`` naming no field of the config is refused with
the closest valid field names before absl parses the flags (ml_collections itself raises a
bare ``AttributeError``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from exo2ego_jax.config_lib import ConfigError, check_override_paths
from exo2ego_jax.training.checkpoints import HandOffError
from exo2ego_jax.training.loop import TrainingDivergedError
from exo2ego_jax.weights.errors import CheckpointError
from input_pipeline.annotations import AnnotationError
from input_pipeline.video import VideoDecodeError

#: Errors whose message is the whole story for a user.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    AnnotationError,
    CheckpointError,
    HandOffError,
    VideoDecodeError,
    TrainingDivergedError,
)
TRACEBACK_ENV = "EXO2EGO_TRACEBACK"


def load_config_arg(argv: Sequence[str], flag: str = "config"):
    """The config named by ``--<flag>=FILE[:ARG]`` in ``argv`` (loaded by ml_collections,
    without overrides), or None when ``argv`` names none."""
    spec = [a for a in argv if a.startswith(f"--{flag}=")][-1:]
    if not spec:
        return None
    path = spec[0].split("=", 1)[1].split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError(f"{spec[0]}: no such file {path!r} (paths are relative to {os.getcwd()})")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(flag, None, "", flag_values=fv, sys_argv=["x", *spec])
    try:
        fv(["x", *spec], known_only=True)
    except flags.Error as e:  # get_config(arg) raised: e.g. an unknown preset
        reason = str(e).strip().splitlines()[-1]
        raise ConfigError(f"{spec[0]}: {reason}") from None
    return fv[flag].value


def check_config_overrides(argv: Sequence[str], flag: str = "config") -> None:
    """Loads the ``--config=`` file of ``argv`` (a clear :class:`ConfigError` if it cannot
    be) and refuses a ``--config.<path>`` that names none of its fields."""
    config = load_config_arg(argv, flag)
    if config is not None:
        check_override_paths(config, list(argv), flag)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run(main)`` with the project's errors reported as one line."""
    argv = list(sys.argv if argv is None else argv)
    show = os.environ.get(TRACEBACK_ENV, "") == "1"
    try:
        check_config_overrides(argv[1:])
        app.run(main, argv=argv)
    except USER_ERRORS as e:
        if show:
            raise
        prog = os.path.basename(argv[0]) if argv else "exo2ego"
        print(f"{prog}: error: {e}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        sys.exit(1)

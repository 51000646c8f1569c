"""The command line: tunelab train | eval | merge | predict | export | chat | generate | student | sweep |
report | recipes | data show. It parses arguments, calls the library and prints; nothing else.

User errors print one line (``tunelab: <where>: <what>``) and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import TunelabError, one_line
from .parser import EPILOG, Parser, build_parser


def quiet_libraries() -> None:
    """No warnings nor progress bars from the libraries underneath: tunelab says what matters itself."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """A process that torchrun or accelerate launched leaves at once, its output flushed and the process group
    already destroyed: the interpreter's own clean-up, with gloo's threads about, sometimes aborts (SIGABRT,
    "terminate called without an active exception") after a run that finished, and the launcher then
    reports the run as failed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`data show R -n 3 k=v`): still overrides
        if getattr(args, "overrides", None) is None or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    level = args.log_level.upper() if args.log_level else ("WARNING" if args.quiet else "INFO")
    logging.basicConfig(level=getattr(logging, level), format="%(message)s", stream=sys.stderr)
    try:
        quiet_libraries()
        return args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"tunelab: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # what the system refused (a full disk, a read-only file system, permissions)
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"tunelab: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 2


__all__ = ["EPILOG", "Parser", "build_parser", "main", "quiet_libraries"]

"""The ``zoo`` command: the app, its global options and the entry point.

The commands live by group (``registry``, ``merge``, ``protect``, ``hub``, ``demo``);
each parses, calls one function of the Python API in ``zoo`` and renders the result
(``render``). Help is click's plain text: the same on a terminal, in a pipe and in
``docs/cli.md`` (``python -m zoo.cli.reference``).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from zoo.cli import demo, extract, hub, merge, moe, protect, registry, render
from zoo.cli.options import REGISTRY_HELP, STORE_HELP, State
from zoo.errors import ZooError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["--help", "-h"]},
                  help="zoo: a registry for base models, experts, adapters, merges and protected models.")


def _version(value: bool) -> None:
    if value:
        from zoo import __version__

        print(f"zoo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(registry: Optional[str] = typer.Option(None, "--registry", metavar="PATH", envvar="ZOO_REGISTRY",
                                                 help=REGISTRY_HELP),
          store: Optional[str] = typer.Option(None, "--store", metavar="PATH", envvar="ZOO_STORE", help=STORE_HELP),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print zoo's version and exit.")) -> None:
    # Every run sets them (None: the default), so nothing carries over between runs in one process.
    State.registry = registry
    State.store = store


for group in (registry.app, merge.app, extract.app, moe.app, protect.app, hub.app, demo.app):
    app.add_typer(group)
app.add_typer(hub.token_app, name="token")
app.add_typer(hub.user_app, name="user")
app.add_typer(hub.org_app, name="org")
app.add_typer(protect.key_app, name="key")
app.add_typer(registry.registry_app, name="registry")
app.add_typer(registry.task_app, name="task")


def _quiet_third_party_bars() -> None:
    """transformers' and huggingface_hub's own progress bars and notices are for a
    terminal: without one (pipes, CI, logs) they would only clutter stderr."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Already imported (e.g. zoo run in-process): tell them directly.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()


def _click_errors() -> tuple[type[Exception], ...]:
    """The exceptions of the click that typer runs on. typer 0.29 ships its own copy,
    whose exceptions derive from typer.TyperException; older typers raise those of the
    click package (already imported by then). Catching ``click.ClickException`` alone
    missed every usage error of typer 0.29."""
    types: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    if "click" in sys.modules:
        types.append(sys.modules["click"].ClickException)
    return tuple(types)


def _interrupted(e: BaseException) -> bool:
    """Whether Ctrl-C caused ``e``: Python wraps a KeyboardInterrupt raised inside some
    machinery (a class body's ``__set_name__`` during an import, for one) in another
    exception."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def main() -> None:
    """Entry point: a usage error is click's usage line and error (exit 2); a user error
    is one line on stderr (exit 1); never a traceback. A registry the failed command
    made for itself is removed again."""
    _quiet_third_party_bars()
    State.created = None
    try:
        _run()
    except SystemExit as e:
        if e.code not in (0, None) and State.created is not None:
            from zoo.registry.listing import discard_if_unused

            discard_if_unused(State.created)
        raise


def entry() -> None:
    """The ``zoo`` program: ``main``, then Ctrl-C ignored while the interpreter shuts
    down. The command's outcome is decided by then; a Ctrl-C could only interrupt the
    atexit callbacks and print a traceback after a finished command."""
    import signal

    try:
        main()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run() -> None:
    try:
        rv = app(standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C into exit code 130
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except ZooError as e:
        render.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        render.error("interrupted; no half-finished change was saved")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        render.error("aborted")
        sys.exit(1)
    except OSError as e:  # the machine said no (disk, permissions, a mount): one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        render.error(f"{where}{e.strerror or e}; nothing was changed")
        sys.exit(1)
    except Exception as e:
        if _interrupted(e):
            render.error("interrupted; no half-finished change was saved")
            sys.exit(130)
        if not isinstance(e, _click_errors()):
            raise
        if hasattr(e, "show"):
            e.show()
        else:
            render.error(e.format_message())
        sys.exit(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    entry()

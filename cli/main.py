"""The `mmkit` command group: error handling, logging, and the list of commands.

Command modules import only click at load time, so `mmkit --help` stays fast; each command
imports torch and transformers inside its body.
"""

from __future__ import annotations

import logging
import os
import signal

import click

from ..core.distributed import is_main
from ..core.errors import MmkitError, Terminated, interrupted_by
from . import completion
from . import (bench, cache, eval as eval_cmd, export, extract, finetune, inspect, merge,
               merge_tokens, prune, quantize, run, search)


class _StderrHandler(logging.Handler):
    """Writes log records to the current stderr (click swaps it in tests and pipes)."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


def _setup_logging(debug: bool) -> None:
    log = logging.getLogger("mmkit")
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if not is_main():  # the other processes of a multi-process run: their problems only
        log.setLevel(logging.WARNING)
    log.propagate = False
    for noisy in ("bitsandbytes", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        # Read by transformers / huggingface_hub when the commands import them.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class MmkitGroup(click.Group):
    """Turns mmkit's exceptions into one-paragraph messages and exit codes.

    0 ok, 1 runtime failure, 2 bad usage or input, 130 interrupted (143 by SIGTERM). --debug
    shows tracebacks.
    """

    def invoke(self, ctx):
        saved = _catch_sigterm()  # the (SIGINT, SIGTERM) handlers to put back
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BaseException as exc:  # noqa: BLE001 - sorted below
            interruption = interrupted_by(exc)
            if interruption is None:
                _fail(ctx, exc)  # an error: its message and exit code (or re-raised)
            if saved is not None:  # a second signal must not cut the exit short
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if _OWN_PROCESS:  # ... nor the interpreter's shutdown: stay ignored to the end
                saved = None
            click.echo("Interrupted; nothing was written.", err=True)
            ctx.exit(143 if isinstance(interruption, Terminated) else 130)
        finally:
            # Inside another program (a notebook, a test run) Ctrl-C must work again after an
            # interrupted command; the `mmkit` process itself is ending anyway.
            if saved is not None:
                signal.signal(signal.SIGINT, saved[0])
                signal.signal(signal.SIGTERM, saved[1])


_OWN_PROCESS = False  # True when the `mmkit` console command owns the process (main())


MAX_MESSAGE = 2000  # characters of an error message shown; a message echoing input is capped


def _fail(ctx, exc: BaseException) -> None:
    """Report an error in one paragraph and exit with its code; --debug re-raises it, and
    what is not an Exception (SystemExit) passes through."""
    if not isinstance(exc, Exception) or _debug(ctx):
        raise exc
    if isinstance(exc, MmkitError):
        click.echo(f"Error: {_clip(str(exc))}", err=True)
        ctx.exit(exc.exit_code)
    click.echo(f"Error: {type(exc).__name__}: {_clip(str(exc))}\n(run again with --debug for "
               "the traceback)", err=True)  # last resort: one line, not a traceback
    ctx.exit(1)


def _clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[:MAX_MESSAGE]}... [{len(text) - MAX_MESSAGE:,} more characters]"


def _catch_sigterm():
    """Turn SIGTERM into an interruption (exit 143, cleanups run); returns the SIGINT and
    SIGTERM handlers it found (None off the main thread, where signals are left alone)."""
    def terminate(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        return None
    return signal.getsignal(signal.SIGINT), previous


def _debug(ctx) -> bool:
    if os.environ.get("MMKIT_DEBUG") == "1" or ctx.meta.get("mmkit.debug"):
        return True
    return False


@click.group(cls=MmkitGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "terminal_width": 100, "max_content_width": 100})
@click.version_option(package_name="mmkit", prog_name="mmkit")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (also MMKIT_DEBUG=1).")
@click.pass_context
def cli(ctx, debug):
    """mmkit: adapt and compress pretrained transformer models.

    MODEL is a hub id, a local Hugging Face folder, an mmkit artifact, a built-in name
    (minilm, smollm2) or tiny:<bert|vit|clip|llama|gpt2>. `-` reads artifact paths from stdin.
    """
    if debug:
        ctx.meta["mmkit.debug"] = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(debug or os.environ.get("MMKIT_DEBUG") == "1")


cli.add_command(eval_cmd.eval_command)
cli.add_command(bench.bench_command)
cli.add_command(cache.cache_group)
cli.add_command(export.export_command)
cli.add_command(extract.extract_command)
cli.add_command(finetune.finetune_command)
cli.add_command(inspect.inspect_command)
cli.add_command(merge.merge_command)
cli.add_command(merge_tokens.merge_tokens_command)
cli.add_command(prune.prune_command)
cli.add_command(quantize.quantize_command)
cli.add_command(run.run_command)
cli.add_command(search.search_group)

completion.register()  # bash completion that keeps tiny:bert whole


def main() -> None:
    """Console entry point."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    cli(prog_name="mmkit")


if __name__ == "__main__":
    main()

"""Shell completion: click's protocol (`_MMKIT_COMPLETE=bash_complete` with COMP_WORDS /
COMP_CWORD) answers commands, options, method names from the registry, built-in model names and
bundled datasets, without importing torch; and bash's own script keeps `tiny:bert` whole."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mmkit.core.data import BUNDLED
from mmkit.core.embedded import ALIASES
from mmkit.core.registry import all_methods
from mmkit.core.tiny import TINY_FAMILIES

MODELS = [*ALIASES, *(f"tiny:{f}" for f in TINY_FAMILIES)]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def complete(line: str, monkeypatch, capsys) -> list[tuple[str, str]]:
    """Click's bash protocol, in this process: the (type, value) pairs answered for `line`
    (words split at spaces; a trailing space starts a new, empty word)."""
    from click.shell_completion import shell_complete

    from mmkit.cli.main import cli

    words = line.split()
    cword = len(words) if line.endswith(" ") else len(words) - 1
    monkeypatch.setenv("COMP_WORDS", "\n".join(words))
    monkeypatch.setenv("COMP_CWORD", str(cword))
    capsys.readouterr()
    assert shell_complete(cli, {}, "mmkit", "_MMKIT_COMPLETE", "bash_complete") == 0
    return [tuple(row.split(",", 1)) for row in capsys.readouterr().out.splitlines()]


def plain(pairs) -> list[str]:
    return [value for kind, value in pairs if kind == "plain"]


def names(step: str) -> list[str]:
    """A step's method names, read from the registry (not from the CLI)."""
    return [m.name for m in all_methods() if m.step == step]


def test_commands_and_options_complete(monkeypatch, capsys):
    assert {"finetune", "quantize", "prune", "merge", "search", "run", "eval"} <= set(
        plain(complete("mmkit ", monkeypatch, capsys)))
    assert {"--bits", "--group-size", "--calib", "--output"} <= set(
        plain(complete("mmkit quantize --", monkeypatch, capsys)))


@pytest.mark.parametrize("command,step", [("quantize", "quantize"), ("prune", "prune"),
                                          ("merge", "merge")])
def test_method_option_completes_the_registered_methods(command, step, monkeypatch, capsys):
    assert plain(complete(f"mmkit {command} --method ", monkeypatch, capsys)) == names(step)
    prefix = names(step)[1][:2]
    assert plain(complete(f"mmkit {command} --method {prefix}", monkeypatch, capsys)) == [
        n for n in names(step) if n.startswith(prefix)]


def test_finetune_method_flags_complete(monkeypatch, capsys):
    answered = set(plain(complete("mmkit finetune --", monkeypatch, capsys)))
    assert {f"--{name}" for name in names("finetune")} <= answered
    assert plain(complete("mmkit finetune --elastic ", monkeypatch, capsys)) == ["nested",
                                                                                 "sampled"]


def test_model_references_complete_names_then_folders(monkeypatch, capsys):
    for line in ("mmkit eval ", "mmkit quantize ", "mmkit search ", "mmkit merge a --base ",
                 "mmkit run r.yaml --model ", "mmkit finetune --distill --teacher "):
        pairs = complete(line, monkeypatch, capsys)
        assert pairs[0][0] == "dir" and plain(pairs) == MODELS, line
    assert plain(complete("mmkit eval sm", monkeypatch, capsys)) == ["smollm2"]
    assert plain(complete("mmkit merge out/a ", monkeypatch, capsys)) == MODELS


def test_datasets_complete_names_then_files(monkeypatch, capsys):
    pairs = complete("mmkit finetune --data ", monkeypatch, capsys)
    assert pairs[0][0] == "file" and plain(pairs) == list(BUNDLED)
    assert plain(complete("mmkit quantize m --calib bbc", monkeypatch, capsys)) == [
        n for n in BUNDLED if n.startswith("bbc")]
    assert plain(complete("mmkit merge a b --data tweets-sentiment,bbc-n", monkeypatch,
                          capsys)) == ["tweets-sentiment,bbc-news"]


def test_device_completes(monkeypatch, capsys):
    assert plain(complete("mmkit eval --device c", monkeypatch, capsys)) == ["cpu", "cuda"]


def test_bash_words_split_at_a_colon_are_joined(monkeypatch, capsys):
    # bash hands `tiny:b` over as three words; the answer is what follows the colon
    monkeypatch.setenv("COMP_WORDS", "mmkit\neval\ntiny\n:\nb")
    monkeypatch.setenv("COMP_CWORD", "4")
    from click.shell_completion import shell_complete

    from mmkit.cli.main import cli

    capsys.readouterr()
    shell_complete(cli, {}, "mmkit", "_MMKIT_COMPLETE", "bash_complete")
    assert plain([tuple(r.split(",", 1)) for r in capsys.readouterr().out.splitlines()]) == [
        "bert"]


@pytest.mark.parametrize("shell,words,cword,expected", [
    # zsh and fish keep words with colons whole: the answers are whole names
    ("zsh", "mmkit eval tiny:l", "2", ["tiny:llama"]),
    ("fish", "mmkit eval tiny:l", "tiny:l", ["tiny:llama"]),
    ("fish", "mmkit quantize --method g", "g", [n for n in names("quantize") if n[0] == "g"]),
])
def test_zsh_and_fish_protocols(shell, words, cword, expected, monkeypatch, capsys):
    from click.shell_completion import shell_complete

    from mmkit.cli.main import cli

    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", cword)
    capsys.readouterr()
    assert shell_complete(cli, {}, "mmkit", "_MMKIT_COMPLETE", f"{shell}_complete") == 0
    out = capsys.readouterr().out
    if shell == "zsh":  # type, value, help: three lines each
        rows = out.splitlines()
        answered = [v for t, v in zip(rows[::3], rows[1::3]) if t == "plain"]
    else:
        answered = plain(tuple(r.split(",", 1)) for r in out.splitlines())
    assert answered == expected


HEAVY_CHECK = textwrap.dedent("""
    import atexit, sys
    heavy = ("torch", "transformers", "peft", "bitsandbytes")
    atexit.register(lambda: sys.stderr.write(
        "HEAVY=" + ",".join(m for m in heavy if m in sys.modules) + "\\n"))
    from mmkit.cli.main import main
    main()
""")


@pytest.mark.parametrize("words,cword,expected", [
    ("mmkit\nquantize\n--method\n", 3, names("quantize")),
    ("mmkit\nfinetune\n--lora\n--data\n", 4, list(BUNDLED)),
    ("mmkit\neval\n", 2, MODELS),
])
def test_completion_runs_as_a_process_without_torch(words, cword, expected):
    env = {**ENV, "_MMKIT_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    out = subprocess.run([sys.executable, "-c", HEAVY_CHECK], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert plain(tuple(r.split(",", 1)) for r in out.stdout.splitlines()) == expected
    assert "HEAVY=\n" in out.stderr, out.stderr  # nothing heavy was imported


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o nosort -F _mmkit_completion"),
                                          ("zsh", "compdef _mmkit_completion mmkit"),
                                          ("fish", "complete --no-files --command mmkit")])
def test_each_shell_gets_its_script(shell, marker):
    env = {**ENV, "_MMKIT_COMPLETE": f"{shell}_source"}
    out = subprocess.run([sys.executable, "-m", "mmkit.cli.main"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0 and marker in out.stdout, out.stdout + out.stderr
    assert "_MMKIT_COMPLETE" in out.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_completes_a_colon_name_in_bash(tmp_path):
    """The script bash sources, run by bash on the words bash makes of `mmkit eval tiny:l`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "mmkit"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m mmkit.cli.main \"$@\"\n")
    exe.chmod(0o755)
    script = textwrap.dedent("""
        compopt() { :; }  # only valid inside a real completion; a no-op here
        eval "$(_MMKIT_COMPLETE=bash_source mmkit)"
        COMP_WORDS=(mmkit eval tiny : l); COMP_CWORD=4
        _mmkit_completion mmkit
        printf 'got:%s\\n' "${COMPREPLY[@]}"
        COMP_WORDS=(mmkit quantize --method g); COMP_CWORD=3
        COMPREPLY=()
        _mmkit_completion mmkit
        printf 'got:%s\\n' "${COMPREPLY[@]}"
    """)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = [line[4:] for line in out.stdout.splitlines() if line.startswith("got:")]
    assert got == ["llama", *[n for n in names("quantize") if n.startswith("g")]]

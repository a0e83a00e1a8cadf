"""Create or update the project's .venv and re-run a bin/ script inside it, with what every bin/ script shares:
a --help that only prints, and Ctrl-C as one line.

Only the standard library is used here: this runs on a fresh machine with nothing but Python 3.10+.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
HELP = {"-h", "--help"}


def venv_python() -> Path:
    """The venv's interpreter, on Windows or elsewhere."""
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def in_venv() -> bool:
    """True when this interpreter is the project's venv."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv(*requirement_files: str) -> Path:
    """Make .venv exist with every requirement file installed; skip pip when nothing changed since last time."""
    if sys.version_info < (3, 10):
        sys.exit(f"error: Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    python = venv_python()
    if not python.exists():
        print(f"Creating {VENV} (first run) ...", file=sys.stderr, flush=True)
        existed = VENV.exists()  # a user's own folder (a venv whose python moved): never ours to delete
        try:
            subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        except (KeyboardInterrupt, subprocess.CalledProcessError) as error:
            # A half-made venv has its python but maybe no pip: the next run would take it for a whole one.
            if not existed:
                shutil.rmtree(VENV, ignore_errors=True)
            if isinstance(error, KeyboardInterrupt):
                raise
            sys.exit(f"error: creating {VENV.name} failed (exit {error.returncode}; the reason is above)")
    digest = hashlib.sha256(sys.version.encode())
    for name in requirement_files:
        digest.update((ROOT / name).read_bytes())
    stamp = VENV / f".installed-{'+'.join(Path(n).parent.name or 'root' for n in requirement_files)}"
    if not stamp.exists() or stamp.read_text() != digest.hexdigest():
        print(f"Installing {', '.join(requirement_files)} into {VENV.name} ...", file=sys.stderr, flush=True)
        command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        for name in requirement_files:
            command += ["-r", str(ROOT / name)]
        if subprocess.call(command) != 0:
            sys.exit(f"error: installing {', '.join(requirement_files)} failed (pip's words are above); run the "
                     "command again once the cause is fixed")
        stamp.write_text(digest.hexdigest())
    return python


def run_in_venv(script: str, requirement_files, argv) -> None:
    """Re-run script with the venv's Python (replacing this process where the OS allows), then never return.
    A --help installs nothing: it runs in the venv there is, or else prints the script's own summary."""
    if HELP.intersection(argv):
        python = venv_python()
        if not python.exists():
            print(f"{sys.modules['__main__'].__doc__.strip()}\n\nIts options are listed here once {VENV.name} "
                  "exists (any bin/ command creates it on its first run).")
            sys.exit(0)
    else:
        python = ensure_venv(*requirement_files)
    command = [str(python), script, *argv]
    if os.name == "nt":
        # Windows has no exec: run it as a child and pass its exit code on.
        try:
            sys.exit(subprocess.call(command))
        except KeyboardInterrupt:
            sys.exit(130)
    os.execv(str(python), command)


@contextmanager
def interruptible():
    """Around a bin/ script's work: Ctrl-C (in an import, the first install, or the run) ends it with one line and
    exit code 130, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def no_arguments(prog: str, doc: str, epilog: str = None) -> None:
    """The command line of a script that takes no arguments: --help prints doc (and epilog) and exits 0; any
    argument is refused with the usage line (exit 2), as a setting given as a flag would be ignored."""
    argparse.ArgumentParser(prog=prog, description=doc, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

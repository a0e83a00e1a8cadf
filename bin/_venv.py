"""Create or update the project's .venv and re-run a bin/ script inside it; shared by the bin/ scripts.

Only the standard library is used here: this runs on a fresh machine with nothing but Python 3.10+.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


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
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    digest = hashlib.sha256(sys.version.encode())
    for name in requirement_files:
        digest.update((ROOT / name).read_bytes())
    stamp = VENV / f".installed-{'+'.join(Path(n).parent.name or 'root' for n in requirement_files)}"
    if not stamp.exists() or stamp.read_text() != digest.hexdigest():
        print(f"Installing {', '.join(requirement_files)} into {VENV.name} ...", file=sys.stderr, flush=True)
        command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        for name in requirement_files:
            command += ["-r", str(ROOT / name)]
        subprocess.check_call(command)
        stamp.write_text(digest.hexdigest())
    return python


def run_in_venv(script: str, requirement_files, argv) -> None:
    """Re-run script with the venv's Python (replacing this process where the OS allows), then never return."""
    python = ensure_venv(*requirement_files)
    command = [str(python), script, *argv]
    if os.name == "nt":
        # Windows has no exec: run it as a child and pass its exit code on.
        try:
            sys.exit(subprocess.call(command))
        except KeyboardInterrupt:
            sys.exit(130)
    os.execv(str(python), command)

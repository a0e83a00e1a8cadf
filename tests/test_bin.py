"""The bin/ commands as a newcomer meets them: --help only prints, a refused connection stops bin/loadtest at once,
Ctrl-C is one line, and a half-made .venv is not left behind."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys

import pytest

from service.llama.supervisor import free_port
from tests.processes import ROOT

BIN = os.path.join(ROOT, "bin")


def run_bin(command, *args, timeout=60, **env):
    """Run bin/command with the test's Python (the venv's: no re-exec) and return the finished process."""
    return subprocess.run([sys.executable, os.path.join(BIN, command), *args], env={**os.environ, **env},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command, words", [
    ("serve", ".env.example"),  # where every setting is listed: it takes no arguments
    ("serve-llama", "LLAMA_SERVER_URL=http://127.0.0.1:8080 python bin/serve"),
    # The whole first sentence, not its first line ("... and against a bare").
    ("bench", "against a bare\nFlask + waitress + requests passthrough, with every policy feature of the gateway "
              "switched on."),
    ("loadtest", "API_HOST and API_PORT"),
    ("pull", "hf:OWNER/REPO[:QUANT]"),
])
def test_help_only_prints(command, words, tmp_path):
    # Were the command to start, it would load the demo model into this empty MODELS_DIR and never end (timeout).
    result = run_bin(command, "--help", timeout=30, MODELS_DIR=str(tmp_path), API_PORT=str(free_port()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: bin/{command} ")
    assert words in result.stdout
    assert result.stderr == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["serve", "serve-llama"])
def test_an_argument_where_none_is_taken_is_refused(command):
    # bin/serve --port 9000 would otherwise serve on 8000 without a word.
    result = run_bin(command, "--port", "9000", timeout=30)
    assert result.returncode == 2
    assert "unrecognized arguments: --port 9000" in result.stderr and result.stdout == ""


def test_loadtest_goes_to_api_port_and_stops_at_the_first_refused_connection():
    port = free_port()  # nothing listens there
    result = run_bin("loadtest", "--duration", "30", "--concurrency", "8", timeout=20, API_PORT=str(port),
                     API_HOST="0.0.0.0")
    assert result.returncode == 1
    assert result.stdout == ""  # no table of a rate of refusals
    line, = result.stderr.splitlines()
    assert line.startswith(f"error: nothing answers at http://127.0.0.1:{port}: ")


def test_loadtest_refuses_a_bad_api_port_in_one_line():
    result = run_bin("loadtest", timeout=20, API_PORT="80x")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: API_PORT: must be a whole number, not '80x'"]


def _ctrl_c_as_at_a_terminal():
    # A test run in the background ignores SIGINT, and its children inherit that: restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_is_one_line_and_exit_130():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        process = subprocess.Popen([sys.executable, os.path.join(BIN, "loadtest"), "--requests", "1",
                                    "--url", f"http://127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=_ctrl_c_as_at_a_terminal)
        silent.settimeout(30)
        connection, _ = silent.accept()  # the run is under way
        try:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=20)
        finally:
            connection.close()
    assert process.returncode == 130
    assert err == "interrupted\n" and out == ""


@pytest.fixture
def venv_module(tmp_path, monkeypatch):
    """bin/_venv.py, loaded as a module, making its .venv in tmp_path."""
    spec = importlib.util.spec_from_file_location("bin_venv", os.path.join(BIN, "_venv.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "VENV", tmp_path / ".venv")
    return module


def test_an_interrupted_first_install_leaves_no_half_made_venv(venv_module, monkeypatch, capsys):
    def interrupted_venv(command):
        # `python -m venv` has written its interpreter (the mark of a made venv), not yet pip, when Ctrl-C comes.
        python = venv_module.venv_python()
        python.parent.mkdir(parents=True)
        python.write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(venv_module.subprocess, "check_call", interrupted_venv)
    with pytest.raises(SystemExit) as exited, venv_module.interruptible():
        venv_module.ensure_venv("requirements.txt")
    assert exited.value.code == 130
    assert not venv_module.VENV.exists()  # the next run makes it again, whole
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


def test_a_failed_install_is_one_line_not_a_traceback(venv_module, monkeypatch):
    venv_module.venv_python().parent.mkdir(parents=True)
    venv_module.venv_python().write_text("")
    monkeypatch.setattr(venv_module.subprocess, "call", lambda command: 1)  # pip said why, above
    with pytest.raises(SystemExit) as exited:
        venv_module.ensure_venv("requirements.txt")
    assert str(exited.value.code).startswith("error: installing requirements.txt failed")
    assert not list(venv_module.VENV.glob(".installed-*"))  # the next run tries again


def test_an_interrupted_venv_made_over_a_users_folder_keeps_the_folder(venv_module, monkeypatch):
    kept = venv_module.VENV / "lib" / "their-files.txt"  # a .venv whose python is gone (Python was upgraded)
    kept.parent.mkdir(parents=True)
    kept.write_text("theirs")

    def interrupted_venv(command):
        raise KeyboardInterrupt

    monkeypatch.setattr(venv_module.subprocess, "check_call", interrupted_venv)
    with pytest.raises(KeyboardInterrupt):
        venv_module.ensure_venv("requirements.txt")
    assert kept.read_text() == "theirs"


def test_help_before_the_first_run_prints_without_installing(venv_module, monkeypatch, capsys):
    monkeypatch.setattr(venv_module, "ensure_venv", lambda *files: pytest.fail("--help installed the venv"))
    monkeypatch.setattr(venv_module.sys.modules["__main__"], "__doc__", "Load-test the gateway: bin/loadtest.")
    with pytest.raises(SystemExit) as exited:
        venv_module.run_in_venv("bin/loadtest", ["requirements.txt"], ["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Load-test the gateway") and "once .venv exists" in out
    assert not venv_module.VENV.exists()

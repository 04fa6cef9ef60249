"""The README's Set-up and server quick-start, run as written (the code blocks are read from
README.md, so a change there that breaks them fails here), on a small random model instead of
apple/FastVLM-0.5B and on a free port instead of 8080. The install half of the Set-up (a fresh
venv, `pip install -e .`) is CI's scripts/check_runtime_install.sh: it needs the package index."""

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEFAULT_MODEL = "apple/FastVLM-0.5B"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def code_blocks(text: str, language: str):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def with_model(command: str, model: Path) -> str:
    """COMMAND with MODEL as its --model: replaced where given, added where left to the default."""
    if f"--model {DEFAULT_MODEL}" in command:
        return command.replace(f"--model {DEFAULT_MODEL}", f"--model {model}")
    return f"{command} --model {model}"


def shell_env():
    # `python` in the README is the venv's: this interpreter's.
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT)}


def test_the_set_up_is_two_commands_the_runtime_then_the_tests():
    lines = code_blocks(section("Set-up"), "bash")[0].strip().splitlines()
    assert len(lines) == 2, lines
    steps = lines[0].split(" && ")
    assert steps[:3] == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -e ."], steps
    assert steps[3].startswith("python -m fastvlm_mlx.generate --image examples/images/")
    # CI runs the README's test command verbatim
    assert lines[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_set_up_main_job_runs_as_written(tiny_converted):
    first = code_blocks(section("Set-up"), "bash")[0].strip().splitlines()[0]
    main_job = first.split(" && ")[-1]
    r = subprocess.run(with_model(main_job, tiny_converted), shell=True, cwd=ROOT, env=shell_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "TTFT:" in r.stderr


def test_the_server_quick_start_runs_as_written(tiny_converted):
    serve = section("Serve")
    command = next(line for line in code_blocks(serve, "bash")[0].splitlines()
                   if line.startswith("python -m fastvlm_mlx.server"))
    command = with_model(command.split("#")[0].strip(), tiny_converted) + " --port 0"
    client = next(b for b in code_blocks(serve, "python") if "from openai import OpenAI" in b)
    assert "8080" in client and "..." not in client
    server = subprocess.Popen(command, shell=True, cwd=ROOT, env=shell_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        url = listening_url(server, timeout=180)
        code = client.replace("http://127.0.0.1:8080/v1", url)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=shell_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        text, image_tokens, ttft = r.stdout.rsplit(maxsplit=2)
        assert int(image_tokens) > 0 and float(ttft) > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def listening_url(server: subprocess.Popen, timeout: float) -> str:
    """The base URL from the line the server prints once it listens."""
    selector = selectors.DefaultSelector()
    selector.register(server.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(timeout=1):
            assert server.poll() is None, "the server exited"
            continue
        line = server.stdout.readline()
        assert line, "the server exited"
        m = re.search(r" at (http://\S+/v1) ", line)
        if m:
            return m.group(1)
    pytest.fail("the server did not say where it listens")

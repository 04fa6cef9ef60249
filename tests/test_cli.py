"""The tools as a newcomer meets them: flags named as mlx-lm's, every default in --help, one-line
usage errors, one line naming the extra a missing package comes with, weights that are easy to
get (the offline and mistyped-path messages, the first conversion said once), outputs that follow
the umask. Nothing here reaches the network."""

import importlib
import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from fastvlm_mlx import _cli

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "examples" / "images" / "chelsea.jpg")
TOOLS = ("generate", "chat", "caption", "convert", "server", "benchmark", "verify")


def parser_of(tool):
    return importlib.import_module(f"fastvlm_mlx.{tool}").build_parser()


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_has_help_and_every_default_shows(tool):
    p = parser_of(tool)
    assert isinstance(p, _cli.ArgumentParser) and p.formatter_class is _cli.HelpFormatter
    formatter = p._get_formatter()
    for action in p._actions:
        if action.dest == "help":
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{tool} {name} has no help text"
        shown = formatter._get_help_string(action)
        if action.option_strings and action.default not in (None, False, []) and not action.required:
            # the value itself, or words saying what it is
            assert "default" in shown, f"{tool} {name}: its default {action.default!r} is not shown"
    text = p.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--model"]])
def test_usage_errors_are_one_line_in_every_tool(tool, argv, capsys):
    main = importlib.import_module(f"fastvlm_mlx.{tool}").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and one_line(err).endswith("(see --help)")


@pytest.mark.parametrize("tool", ("generate", "chat", "caption"))
def test_generate_chat_and_caption_take_mlx_lm_flags(tool, capsys):
    p = parser_of(tool)
    a = p.parse_args(["-p", "Q", "--system-prompt", "S", "-m", "7"])
    assert (a.prompt, a.system, a.max_tokens, a.quiet) == ("Q", "S", 7, False)
    assert p.parse_args(["--system", "S2"]).system == "S2"
    for argv, quiet in ((["--verbose", "False"], True), (["--verbose", "T"], False), (["--verbose"], False),
                        (["--quiet"], True), ([], False)):
        assert p.parse_args(argv).quiet is quiet, argv
    with pytest.raises(SystemExit):  # -q is convert's --quantize, as in mlx-lm; never "quiet"
        p.parse_args(["-q"])
    capsys.readouterr()


def test_convert_keeps_q_for_quantize_and_its_model_takes_hub_ids():
    p = parser_of("convert")
    assert p.parse_args(["--model", "a/b", "--out", "o", "-q"]).quantize
    help_of_model = next(a.help for a in p._actions if a.dest == "model")
    assert "hub id" in help_of_model


# -- a missing optional package: one line naming its extra ----------------------------------------


def test_the_server_names_its_extra_before_loading_anything(monkeypatch, capsys):
    from fastvlm_mlx import server

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert server.main(["--model", "/nonexistent/model", "--port", "0"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "uvicorn" in line and 'pip install "fastvlm-mlx[server]"' in line


def test_the_benchmark_plot_names_its_extra(monkeypatch, capsys):
    from fastvlm_mlx import benchmark

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert benchmark.main(["--arch", "0.5b", "--plot", "x.png"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "matplotlib" in line and 'pip install "fastvlm-mlx[plot]"' in line


def test_verify_names_its_extra(monkeypatch):
    from fastvlm_mlx.reference import ReferenceNotInstalled, check_reference_packages

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ReferenceNotInstalled, match=r'timm, which|timm is not installed.*fastvlm-mlx\[verify\]'):
        check_reference_packages()


def test_a_missing_peer_is_named_with_its_install_line(monkeypatch):
    from fastvlm_mlx.peers import unavailable

    monkeypatch.setitem(sys.modules, "torch", None)
    assert 'pip install "fastvlm-mlx[verify]"' in unavailable("torch")
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)
    assert "pip install mlx-vlm" in unavailable("mlx-vlm")


def test_the_benchmark_skips_a_missing_peer_before_any_work_and_names_what_it_writes(
        tiny_converted, monkeypatch, tmp_path, capsys):
    from fastvlm_mlx import benchmark

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)
    out = tmp_path / "bench.json"
    old = os.umask(0o002)
    try:
        code = benchmark.main(["--model", str(tiny_converted), "--compare", "mlx-vlm", "--resolutions", "256",
                               "--runs", "1", "--warmup", "0", "--tokens", "2", "--quiet", "--json", str(out)])
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: skipping")]
    assert len(notes) == 1 and "pip install mlx-vlm" in notes[0]
    assert err.index("note: skipping") < err.index(f"wrote {out}")
    doc = json.loads(out.read_text())
    assert [r["runtime"] for r in doc["results"]] == ["fastvlm-mlx"] and "mlx-vlm" in doc["skipped_peers"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o664  # the umask's, not mkstemp's 0600


# -- getting weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("given, hint", [
    ("./FastVLM-0.5b", None), ("~/models/nope-fastvlm", None), ("/nonexistent/FastVLM", None),
    ("a/b/c", "nor a Hugging Face repo id"), ("FastVLM-0.5B", "nor a Hugging Face repo id"),
    ("mlx/FastVLM-0.5b", None),  # beside an mlx/ folder: a path, not a hub id
])
def test_a_mistyped_path_is_no_such_directory_and_never_goes_to_the_hub(given, hint, tmp_path, monkeypatch):
    import huggingface_hub

    from fastvlm_mlx.checkpoint import ConvertError, resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlx").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(ConvertError) as e:
        resolve_source(given)
    assert str(e.value).startswith(f"{given}: no such directory")
    assert hint is None or hint in str(e.value)


def test_offline_says_how_to_download_elsewhere_and_names_the_installed_converter(monkeypatch, tmp_path):
    import huggingface_hub

    from fastvlm_mlx.checkpoint import SourceUnavailable, resolve_source

    class LocalEntryNotFoundError(Exception):
        pass

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SourceUnavailable) as e:
        resolve_source("apple/FastVLM-0.5B")
    message = str(e.value)
    assert "\n" not in message and "LocalEntryNotFoundError" in message
    assert "hf download apple/FastVLM-0.5B --local-dir PATH" in message and "--model PATH" in message
    assert "python -m fastvlm_mlx convert --model PATH --out mlx/FastVLM-0.5B" in message
    assert "python -m convert" not in message


def test_generate_with_a_mistyped_model_path_is_one_line(capsys):
    from fastvlm_mlx import generate

    assert generate.main(["--model", "./no-such-model", "--image", IMAGE]) == 1
    assert one_line(capsys.readouterr().err) == "error: ./no-such-model: no such directory"


def test_the_first_conversion_is_said_once(tiny_source, tmp_path, monkeypatch, capsys):
    import fastvlm_mlx
    from fastvlm_mlx.loader import converted_path

    monkeypatch.setenv("FASTVLM_MLX_CACHE", str(tmp_path / "cache"))
    converted_path(tiny_source[1])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # (no progress bar: stderr is not a terminal)
    assert re.match(rf"fastvlm_mlx: converting {re.escape(str(tiny_source[1]))} \(\d+\.\d+ [MG]B of weights\) "
                    "to float16 into ", err[0]), err[0]
    assert str(tmp_path / "cache") in err[0] and err[0].endswith("once: later loads reuse it")
    fastvlm_mlx.load(tiny_source[1], lazy=True)
    assert capsys.readouterr().err == ""


# -- outputs follow the umask ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_converted_models_follow_the_umask(tiny_converted, tmp_path, umask):
    from fastvlm_mlx.convert import convert

    old = os.umask(umask)
    try:
        out = convert(tiny_converted, tmp_path / "out", dtype="float16")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & ~(0o666 & ~umask) == 0, f


# -- chat -------------------------------------------------------------------------------------------


def test_chat_on_a_terminal_starts_with_a_banner_and_the_way_out(tiny_converted, monkeypatch, capsys):
    import io

    from fastvlm_mlx import chat

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("/exit\n"))
    assert chat.main(["--model", str(tiny_converted), "--image", IMAGE, "--quiet"]) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith(f"fastvlm-chat: {tiny_converted}, 1 image(s).") and "/exit" in first and "Ctrl+D" in first


# -- the install: pyproject's extras, the test command's check, the missing-extra lines agree ------


def extras_of_pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = project["name"]

    def packages(extra):
        out = set()
        for req in project["optional-dependencies"][extra]:
            m = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req)
            if m.group(1) == name:  # fastvlm-mlx[server,plot,verify]: those extras' packages
                for other in m.group(3).split(","):
                    out |= packages(other.strip())
            else:
                out.add(m.group(1).lower())
        return out

    return {extra: packages(extra) for extra in project["optional-dependencies"]}, project["dependencies"]


def test_the_test_command_checks_for_the_whole_test_extra():
    extras, runtime = extras_of_pyproject()
    script = (ROOT / "scripts" / "test.sh").read_text()
    names = set(re.findall(r'"([\w-]+)"', script[script.index("names = ("):script.index("sys.exit(any")]))
    assert names == extras["test"]  # (each of these packages imports under its own name)
    assert not any(r.startswith(("torch", "timm", "fastapi", "uvicorn", "openai", "matplotlib")) for r in runtime)


def test_each_missing_extra_line_names_an_extra_that_holds_the_package():
    from fastvlm_mlx.extras import EXTRAS

    extras, _ = extras_of_pyproject()
    for extra, modules in EXTRAS.items():
        assert set(modules) <= extras[extra], extra
    assert "openai" in extras["server"]  # the README's snippet and examples/openai_client.py

"""caption.py: folders, globs and list files into JSONL; error rows for bad files; a rerun skips
what is done; kill -9 mid-run leaves only whole lines and a rerun completes exactly the missing
rows; two ranks under `mlx.launch --backend ring` on loopback share the files and rank 0
merges their shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_generate
from fastvlm_mlx.caption import RowWriter, find_images, read_rows
from fastvlm_mlx.generate import generate

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is in this picture?"


def write_png(path, seed, size=(96, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    return test_generate.write_png(path, seed, size)


def caption(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "fastvlm_mlx", "caption", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def lines_of(path):
    data = Path(path).read_bytes()
    assert data.endswith(b"\n"), "a partial last line"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line parses


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    for i in range(5):
        write_png(d / ("sub" if i % 2 else "") / f"img{i}.png", 20 + i)
    (d / "broken.png").write_bytes(b"this is not a png" * 4)
    (d / "notes.txt").write_text("not an image, not listed")
    (d / "._img0.png").write_bytes(b"macOS metadata")
    return d


def test_find_images_folders_globs_lists(folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text(f"# a comment\n{folder / 'img0.png'}\n\n{tmp_path / 'missing.jpg'}\n")
    found = find_images([str(folder), str(folder / "sub" / "*.png")], [str(listed)])
    names = [Path(p).name for p in found]
    assert sorted(names) == sorted(["broken.png", "img0.png", "img1.png", "img2.png", "img3.png",
                                    "img4.png", "missing.jpg"])
    assert len(found) == len(set(found)) == 7  # the glob's and the list's repeats are dropped


def test_caption_rows_errors_and_resume(tiny_converted, tiny_loaded, folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    listed = tmp_path / "list.txt"
    listed.write_text(str(tmp_path / "missing.jpg") + "\n")
    args = [folder, "--list", listed, "--out", out, "--model", tiny_converted, "--prompt", PROMPT,
            "--max-tokens", 6, "--batch-size", 2]
    p = caption(*args)
    assert p.returncode == 0, p.stderr
    rows = lines_of(out)
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == 7
    errors = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.png", "missing.jpg"}
    assert "not found" in errors["missing.jpg"] and "broken.png" in errors["broken.png"]
    model, processor = tiny_loaded
    for path, row in by_path.items():
        if "error" in row:
            continue
        alone = generate(model, processor, PROMPT, [path], max_tokens=6, feature_cache=False)
        assert row["text"] == alone.text
        assert row["generation_tokens"] == len(alone.token_ids) and row["image_tokens"] == 16
        assert row["prompt_tokens"] == alone.prompt_tokens and row["finish_reason"] == alone.finish_reason
        t = row["timings"]
        assert t["ttft_ms"] > 0 and t["vision_ms"] > 0 and t["batch_vision_ms"] >= t["vision_ms"]
    assert "5 captioned, 2 error rows" in p.stderr

    # A rerun does nothing; --retry-errors tries the error rows again (now one is fixed).
    again = caption(*args)
    assert again.returncode == 0 and "7 done already, 0 to caption" in again.stderr
    assert lines_of(out) == rows
    write_png(folder / "broken.png", 99)
    retry = caption(*args, "--retry-errors")
    assert retry.returncode == 0 and "2 to caption" in retry.stderr, retry.stderr
    assert lines_of(out)[:7] == rows and len(lines_of(out)) == 9
    final = read_rows(str(out))
    assert "text" in final[str(folder / "broken.png")] and "error" in final[str(tmp_path / "missing.jpg")]


def test_kill_9_loses_only_rows_in_flight(tiny_converted, tmp_path):
    d = tmp_path / "many"
    paths = [write_png(d / f"{i:03d}.png", 100 + i, size=(64, 48)) for i in range(24)]
    out = tmp_path / "captions.jsonl"
    args = [d, "--out", out, "--model", tiny_converted, "--max-tokens", 24, "--batch-size", 2, "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fastvlm_mlx", "caption", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = lines_of(out)  # whole lines only
    assert 4 <= len(before) < len(paths)
    # A write cut mid-line (a power loss; kill -9 cannot cut an os.write) is dropped on resume.
    with open(out, "ab") as f:
        f.write(b'{"path": "' + str(paths[-1]).encode() + b'", "text": "cut he')
    p = caption(*args)
    assert p.returncode == 0, p.stderr
    after = lines_of(out)
    assert after[: len(before)] == before, "the rows written before the kill changed"
    assert sorted(r["path"] for r in after) == sorted(map(str, paths)), "not exactly the missing rows"


def test_row_writer_cuts_a_partial_last_line(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_bytes(b'{"path": "a"}\n{"path": "b", "te')
    assert list(read_rows(str(out))) == ["a"]
    w = RowWriter(str(out))
    w.write({"path": "c"})
    w.close()
    assert out.read_bytes() == b'{"path": "a"}\n{"path": "c"}\n'
    out.write_bytes(b'{"path": "no newline at all"')
    RowWriter(str(out)).close()
    assert out.read_bytes() == b""


def test_caption_command_dispatch_and_usage_errors():
    p = caption("--help")
    assert p.returncode == 0 and "usage: fastvlm-caption" in p.stdout and "--batch-size" in p.stdout
    bad = caption("--batch-size", "lots")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stderr.count("\n") == 1
    none = caption(str(ROOT / "no-such-folder" / "*.png"), "--out", os.devnull)
    assert none.returncode == 1 and "no images found" in none.stderr and "Traceback" not in none.stderr


def test_two_ranks_share_the_files_and_rank_0_merges(tiny_converted, tmp_path):
    """mlx.launch -n 2 --backend ring on loopback. The output already holds one row and a shard
    left by a killed run holds another: both are skipped, the rest is split between the ranks,
    and rank 0 merges every shard into the output, each path once."""
    d = tmp_path / "photos"
    paths = [str(write_png(d / f"{i}.png", 200 + i)) for i in range(7)]
    out = tmp_path / "captions.jsonl"
    old = {"path": paths[0], "text": "from an earlier run"}
    out.write_text(json.dumps(old) + "\n")
    leftover = {"path": paths[1], "text": "from a killed run's shard"}
    Path(f"{out}.rank1").write_text(json.dumps(leftover) + "\n")
    launcher = Path(sys.executable).with_name("mlx.launch")
    p = subprocess.run(
        [str(launcher), "-n", "2", "--backend", "ring", "--python", sys.executable, "--",
         "-m", "fastvlm_mlx", "caption", str(d), "--out", str(out), "--model", str(tiny_converted),
         "--max-tokens", "5", "--batch-size", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "7 images, 2 done already, 5 to caption on 2 ranks" in p.stdout + p.stderr
    assert "rank 0: 3 captioned" in p.stdout + p.stderr and "rank 1: 2 captioned" in p.stdout + p.stderr
    rows = lines_of(out)
    assert rows[0] == old and leftover in rows
    assert sorted(r["path"] for r in rows) == sorted(paths)
    assert all("text" in r for r in rows)
    assert not list(tmp_path.glob("captions.jsonl.rank*")), "shards left behind"

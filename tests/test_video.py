"""Video input: frames sampled from small videos the tests write with PyAV (solid colour frames at
a known rate), their order and timestamps, the same answer as the frames passed as images, the
feature cache, and every refusal in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from fastvlm_mlx import FeatureCache  # noqa: E402
from fastvlm_mlx.generate import ContextLengthError, generate, images_that_fit, stream_generate  # noqa: E402
from fastvlm_mlx.video import (  # noqa: E402
    DEFAULT_FRAMES, MISSING_PYAV, VideoError, read_video, sample_positions,
)
from reference import CountingTower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATE = 5  # frames per second of the test videos
# Far apart in RGB, so that a decoded frame (YUV 4:2:0 rounding moves it a few levels) is
# told by its nearest colour.
PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
                    (255, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128), (255, 128, 0)])
PROMPT = "What happens in the video?"
# See test_generate: float32 rounding leaves logprobs ~1e-5 apart.
TOL = 1e-4


def write_video(path, n_frames=len(PALETTE), codec="mpeg4", rate=RATE, size=64):
    """N_FRAMES solid frames cycling through PALETTE, at RATE frames per second."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            pixels = np.full((size, size, 3), PALETTE[i % len(PALETTE)], np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def colour_indices(images):
    """Each image's PALETTE index (by its centre pixel's nearest colour)."""
    out = []
    for im in images:
        centre = np.asarray(im, dtype=float)[im.size[1] // 2, im.size[0] // 2]
        out.append(int(np.argmin(((PALETTE - centre) ** 2).sum(axis=1))))
    return out


CODECS = [c for c in ("mpeg4", "libx264") if c in av.codecs_available]


@pytest.fixture(scope="module")
def videos(module_tmp):
    d = module_tmp("videos")
    out = {f"{ext}-{codec}": write_video(d / f"clip-{codec}.{ext}", codec=codec)
           for ext in ("mp4", "mkv") for codec in CODECS}
    out["clip"] = out["mp4-mpeg4"]
    out["long"] = write_video(d / "long.mp4", n_frames=300)
    # A video stream and no frames (AVI keeps the stream header; MP4 and Matroska drop it).
    with av.open(str(d / "empty.avi"), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    out["empty"] = d / "empty.avi"
    # Matroska writes its duration in the header: cut in half, it declares 2 s and holds 0.4 s.
    data = out["mkv-mpeg4"].read_bytes()
    out["truncated"] = d / "truncated.mkv"
    out["truncated"].write_bytes(data[: len(data) // 2])
    with av.open(str(d / "audio.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    out["audio"] = d / "audio.wav"
    from PIL import Image

    Image.new("RGB", (32, 32), (9, 9, 9)).save(d / "still.png")
    out["image"] = d / "still.png"
    (d / "notes.txt").write_text("not a video\n" * 20)
    out["text"] = d / "notes.txt"
    out["missing"] = d / "nope.mp4"
    return out


# ------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_positions_are_segment_centres():
    assert DEFAULT_FRAMES == 8
    assert sample_positions(2.0, frames=4) == pytest.approx([0.25, 0.75, 1.25, 1.75])
    assert sample_positions(2.0) == pytest.approx([(i + 0.5) / 4 for i in range(8)])
    assert sample_positions(2.0, fps=1) == pytest.approx([0.5, 1.5])
    assert sample_positions(2.6, fps=1) == pytest.approx([0.5, 1.5, 2.5])
    assert sample_positions(2.4, fps=1) == pytest.approx([0.5, 1.5])  # (2.5 is past the end)
    assert sample_positions(0.4, fps=1) == pytest.approx([0.2])  # shorter than half a segment
    # frames=N is fps=N/D.
    for n, d in [(3, 2.0), (8, 7.3), (5, 0.9)]:
        assert sample_positions(d, frames=n) == pytest.approx(sample_positions(d, fps=n / d))
    for bad in [dict(frames=0), dict(frames=2.5), dict(fps=0), dict(fps=float("nan")),
                dict(frames=2, fps=1)]:
        with pytest.raises(VideoError):
            sample_positions(2.0, **bad)


@pytest.mark.parametrize("name", [f"{ext}-{codec}" for ext in ("mp4", "mkv") for codec in CODECS])
def test_frames_come_in_order_at_their_times(videos, name):
    v = read_video(videos[name])
    assert v.duration == pytest.approx(2.0)
    # The frame shown at each position: the last to start at or before it (frame k starts at k/5).
    expected = [int(p * RATE) for p in v.positions]
    assert expected == [0, 1, 3, 4, 5, 6, 8, 9]
    assert colour_indices(v.images) == expected
    assert v.timestamps == pytest.approx([k / RATE for k in expected])
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in v.images)

    v = read_video(videos[name], frames=3)
    assert colour_indices(v.images) == [1, 5, 8] and v.timestamps == pytest.approx([0.2, 1.0, 1.6])
    v = read_video(videos[name], fps=1)
    assert v.positions == pytest.approx([0.5, 1.5])
    assert colour_indices(v.images) == [2, 7] and v.timestamps == pytest.approx([0.4, 1.4])


def test_a_frame_is_never_repeated(videos):
    for kwargs in [dict(fps=100), dict(frames=25)]:  # above the video's 5 fps, or its 10 frames
        v = read_video(videos["clip"], **kwargs)
        assert colour_indices(v.images) == list(range(10)), kwargs
        assert v.timestamps == pytest.approx([k / RATE for k in range(10)])


def test_a_frame_limit_is_refused_before_decoding(videos):
    from fastvlm_mlx.video import FrameLimitError

    with pytest.raises(FrameLimitError) as e:
        read_video(videos["long"], frames=300, max_frames=20)
    assert (e.value.wanted, e.value.limit) == (300, 20)
    # 25 positions on a 10-frame video are 10 frames: within a limit of 10.
    assert len(read_video(videos["clip"], frames=25, max_frames=10).images) == 10


# ------------------------------------------------------------------------------------------------
# Generation


def test_the_answer_equals_the_frames_as_images(tiny_loaded, videos):
    model, processor = tiny_loaded
    frames = read_video(videos["clip"], frames=4).images
    as_images = generate(model, processor, PROMPT, images=frames, max_tokens=6, feature_cache=False)
    from_video = generate(model, processor, PROMPT, video=videos["clip"], frames=4, max_tokens=6,
                          feature_cache=False)
    assert from_video.token_ids == as_images.token_ids
    np.testing.assert_allclose(from_video.logprobs, as_images.logprobs, atol=TOL, rtol=0)
    assert from_video.image_tokens == 4 * processor.tokens_per_image()
    t = from_video.timings
    assert t.load_ms > 0 and t.vision_ms > 0  # decoding outside TTFT, the encoder inside
    # The frames' order matters: reversed, the answer differs.
    reversed_ = generate(model, processor, PROMPT, images=frames[::-1], max_tokens=6,
                         feature_cache=False)
    assert not np.allclose(reversed_.logprobs[:1], as_images.logprobs[:1], atol=1e-3) \
        or reversed_.token_ids != as_images.token_ids

    streamed = list(stream_generate(model, processor, PROMPT, video=videos["clip"], fps=1,
                                    max_tokens=2, feature_cache=False))
    assert streamed[-1].image_tokens == 2 * processor.tokens_per_image()


def test_frames_go_through_the_feature_cache(tiny_loaded, videos):
    model, processor = tiny_loaded
    cache = FeatureCache(16)
    with CountingTower(model) as tower:
        first = generate(model, processor, PROMPT, video=videos["clip"], frames=3, max_tokens=3,
                         feature_cache=cache)
        assert tower.calls == 1 and not first.feature_cache_hit and len(cache) == 3
        again = generate(model, processor, "And then?", video=videos["clip"], frames=3, max_tokens=3,
                         feature_cache=cache)
        assert tower.calls == 1 and again.feature_cache_hit and again.timings.vision_ms == 0
        # The same frames from another file (mp4 and Matroska hold the same encoded frames):
        # keyed by their pixels, they are hits.
        mkv = generate(model, processor, PROMPT, video=videos["mkv-mpeg4"], frames=3, max_tokens=3,
                       feature_cache=cache)
        assert tower.calls == 1 and mkv.feature_cache_hit and len(cache) == 3
        other = generate(model, processor, PROMPT, video=videos["clip"], frames=2, max_tokens=3,
                         feature_cache=cache)
    assert tower.calls == 2 and not other.feature_cache_hit and len(cache) == 5
    assert first.token_ids == generate(model, processor, PROMPT, video=videos["clip"], frames=3,
                                       max_tokens=3, feature_cache=False).token_ids


def test_api_refusals(tiny_loaded, videos):
    model, processor = tiny_loaded
    cases = [
        (dict(video=videos["clip"], images=[videos["image"]]), "not both"),
        (dict(video=videos["clip"], frames=2, fps=1), "give one of them"),
        (dict(frames=2), "need video"),
        (dict(video=videos["truncated"]), "truncated"),
        (dict(video=videos["long"], frames=300), "at most"),
        (dict(video="https://example.com/clip.mp4"), "URLs are not read"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            generate(model, processor, PROMPT, max_tokens=1, **kwargs)


def test_how_many_frames_fit_is_the_context_rule(tiny_loaded):
    from fastvlm_mlx.generate import check_context

    model, processor = tiny_loaded
    size = processor.image_size
    fit = images_that_fit(model, processor, PROMPT, size)
    assert fit and fit < 300
    check_context(model, len(processor.prompt_ids(PROMPT, fit, size)), 0)
    with pytest.raises(ContextLengthError):
        check_context(model, len(processor.prompt_ids(PROMPT, fit + 1, size)), 0)


# ------------------------------------------------------------------------------------------------
# The CLI


def run_cli(*args, module="fastvlm_mlx.generate", pre="", stdin="", timeout=180):
    code = f"import sys\n{pre}\nfrom {module} import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, input=stdin, timeout=timeout,
                          env=dict(os.environ))


def test_cli_json_names_the_frames(tiny_converted, videos, tiny_loaded):
    p = run_cli("--model", tiny_converted, "--video", videos["clip"], "--frames", 3, "--prompt", PROMPT,
                "--max-tokens", 4, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["video"] == {"duration_s": 2.0, "timestamps_s": [0.2, 1.0, 1.6]}
    model, processor = tiny_loaded
    frames = read_video(videos["clip"], frames=3).images
    assert out["token_ids"] == generate(model, processor, PROMPT, images=frames, max_tokens=4,
                                        feature_cache=False).token_ids
    assert out["image_tokens"] == 3 * processor.tokens_per_image()

    p = run_cli("--model", tiny_converted, "--video", videos["clip"], "--fps", 1, "--max-tokens", 2)
    assert p.returncode == 0, p.stderr
    assert "Video: 2 frames at 0.40, 1.40 s of 2.00 s" in p.stderr

    p = run_cli("--model", tiny_converted, "--video", videos["clip"], "--frames", 2, "--prompt", PROMPT,
                "--max-tokens", 2, "--quiet", module="fastvlm_mlx.chat")
    assert p.returncode == 0 and p.stdout.strip(), p.stderr


@pytest.mark.parametrize("case,needle", [
    ("missing", "video not found"),
    ("text", "not a video file"),
    ("audio", "no video stream"),
    ("image", "is an image"),
    ("empty", "no frames"),
    ("truncated", "truncated"),
    ("too-many", "at most"),
    ("with-image", "not both"),
])
def test_cli_bad_video_is_one_line(case, needle, tiny_converted, videos):
    extra = []
    if case == "too-many":
        video, extra = videos["long"], ["--frames", 300]
    elif case == "with-image":
        video, extra = videos["clip"], ["--image", videos["image"]]
    else:
        video = videos[case]
    p = run_cli("--model", tiny_converted, "--video", video, "--max-tokens", 2, *extra)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert p.stdout == ""
    if case == "too-many":
        model_fit = lines[0].split("at most ")[1].split()[0]
        assert model_fit.isdigit() and 0 < int(model_fit) < 300


def test_cli_frames_and_fps_are_exclusive(tiny_converted, videos):
    p = run_cli("--model", tiny_converted, "--video", videos["clip"], "--frames", 2, "--fps", 1)
    assert p.returncode == 2 and "not allowed with" in p.stderr and len(p.stderr.splitlines()) == 1


def test_a_missing_pyav_is_one_line_naming_the_extra(tiny_converted, videos):
    p = run_cli("--model", tiny_converted, "--video", videos["clip"], pre="sys.modules['av'] = None")
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {MISSING_PYAV}"
    assert 'pip install "fastvlm-mlx[video]"' in MISSING_PYAV


def test_batch_generate_takes_a_video_per_prompt(tiny_loaded, videos):
    from fastvlm_mlx import batch_generate

    model, processor = tiny_loaded
    results = batch_generate(model, processor, [PROMPT, "Hello"], videos=[videos["clip"], None],
                             frames=3, max_tokens=4, feature_cache=False)
    alone = generate(model, processor, PROMPT, video=videos["clip"], frames=3, max_tokens=4,
                     feature_cache=False)
    assert results[0].token_ids == alone.token_ids
    assert results[0].image_tokens == 3 * processor.tokens_per_image() and results[1].image_tokens == 0

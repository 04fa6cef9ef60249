"""Video input: frames sampled from a video file with PyAV (the optional `video` extra).

FastVLM was trained on single images. A video here is several images in one prompt, its frames in
time order; nothing tells the model they are frames of one clip.

Sampling positions, in seconds from the video's start (its first frame's presentation time):
- `frames=N` (default 8): the centres of N equal segments of the duration D, (i + 1/2) * D / N.
  Each frame stands for an equal share of the video, and neither end is taken: a first frame is
  often a black or title frame, and the very end is where a declared duration and the last
  decodable frame disagree.
- `fps=F`: the same rule with segments of 1/F seconds, (k + 1/2) / F for every such time < D
  (`frames=N` is `fps=N/D`); a video shorter than half a segment gives its centre, D / 2.
Each position takes the frame shown at that time (the last one that starts at or before it). A
frame is never repeated: positions that fall in one frame give it once, so an `fps` above the
video's own rate, or more `frames` than the video has, give each frame once.

Decoding is sequential, in presentation order, and keeps only the wanted frames (one decoded
frame is held besides them), so memory does not grow with the video's length.

Refused, each in one line (VideoError, an InputError): a missing file or one that is not a
video (no video stream, or an image: pass that as an image), a URL, a video with no frames, one
with frames over the pixel cap, and a truncated or damaged one (its decodable frames end more
than a frame interval before the last sampling position, or a packet fails to decode). A truncated video is refused rather than
sampled on what is left: the positions were spread over the duration it declares, and an answer
about part of it would be an answer about another clip than the user thinks.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

from PIL import Image

from .config import InputError
from .processing import check_regular_file, is_url, pixel_cap
from .timing import ms_since

DEFAULT_FRAMES = 8
MISSING_PYAV = 'video input needs PyAV: pip install "fastvlm-mlx[video]"'

VideoInput = Union[str, Path]


class VideoError(InputError):
    """A video that cannot be used; the message says why in one line."""


class FrameLimitError(VideoError):
    """More frames were asked for than the caller allows (`wanted` > `limit`)."""

    def __init__(self, wanted: int, limit: int):
        super().__init__(f"{wanted} frames are more than the {limit} allowed")
        self.wanted, self.limit = wanted, limit


@dataclass
class Video:
    """Sampled frames: RGB images in time order, each frame's presentation time (seconds from the
    video's start), the duration sampled over, and the time spent decoding (ms)."""

    images: List[Image.Image]
    timestamps: List[float]
    duration: float
    decode_ms: float = 0.0
    positions: List[float] = field(default_factory=list)  # the sampling positions asked for


def _import_av():
    try:
        import av
    except ImportError:
        raise VideoError(MISSING_PYAV) from None
    return av


def check_file(path: VideoInput) -> None:
    """What can be told without opening PATH: PyAV is installed, and PATH is a regular file."""
    _import_av()
    if is_url(path):
        raise VideoError(f"video URLs are not read ({path}): download the file and pass its path")
    check_regular_file(Path(path), "video")


def check_sampling(frames: Optional[int] = None, fps: Optional[float] = None) -> None:
    """Refuse a bad `frames` / `fps` (one or neither may be given)."""
    if frames is not None and fps is not None:
        raise VideoError("frames and fps are two ways to sample a video: give one of them")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise VideoError(f"frames must be a whole number >= 1, got {frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not math.isfinite(fps) or fps <= 0):
        raise VideoError(f"fps must be a finite number > 0, got {fps!r}")


def sample_positions(duration: float, frames: Optional[int] = None,
                     fps: Optional[float] = None) -> List[float]:
    """The sampling positions (seconds) over DURATION: see the module's docstring."""
    check_sampling(frames, fps)
    if fps is None:
        n = frames or DEFAULT_FRAMES
        return [(i + 0.5) * duration / n for i in range(n)]
    positions = []
    while (len(positions) + 0.5) / fps < duration:
        positions.append((len(positions) + 0.5) / fps)
    return positions or [duration / 2]


def _seconds(value, time_base) -> Optional[float]:
    return None if value is None or time_base is None else float(value * time_base)


def _tag_seconds(text: Optional[str]) -> Optional[float]:
    """Matroska's per-track DURATION tag, "HH:MM:SS.nnnnnnnnn"."""
    try:
        h, m, s = str(text).split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except (TypeError, ValueError):
        return None


def _declared_duration(container, stream) -> Optional[float]:
    """The video stream's duration as the file declares it: the stream's own, Matroska's track
    tag, else the container's (which may include other streams)."""
    for seconds in (_seconds(stream.duration, stream.time_base),
                    _tag_seconds(stream.metadata.get("DURATION")),
                    container.duration / 1e6 if container.duration else None):
        if seconds:
            return seconds
    return None


def _scanned_duration(av, path: Path, start: float) -> Optional[float]:
    """The end of the last packet of the (first) video stream, from a demux pass (no decoding)
    of its own, for a file that declares no duration (a live recording, for one)."""
    end = None
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.pts is not None:
                t = _seconds(packet.pts + (packet.duration or 0), packet.time_base) - start
                end = t if end is None else max(end, t)
    return end


def read_video(path: VideoInput, frames: Optional[int] = None, fps: Optional[float] = None,
               max_frames: Optional[int] = None, max_pixels: Optional[int] = None) -> Video:
    """Frames of the video at PATH sampled by FRAMES (default DEFAULT_FRAMES) or FPS (see the
    module's docstring), as RGB PIL images with their timestamps. More than MAX_FRAMES frames
    raise FrameLimitError, before decoding when the file's frame count tells (and so without
    keeping more than MAX_FRAMES images); frames over MAX_PIXELS (the images' pixel cap) are
    refused. Every failure is a VideoError."""
    check_sampling(frames, fps)
    t0 = time.perf_counter()
    check_file(path)
    av = _import_av()
    path = Path(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot read video {path}: not a video file PyAV can open "
                         f"({e.strerror or type(e).__name__})") from None
    try:
        with container:
            images, timestamps, duration, positions = _sample(
                av, container, path, frames, fps, max_frames, max_pixels)
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot read video {path}: {e.strerror or type(e).__name__}") from None
    return Video(images, timestamps, duration, ms_since(t0), positions)


def _sample(av, container, path, frames, fps, max_frames, max_pixels):
    """read_video on the open CONTAINER: (images, timestamps, duration, positions)."""
    if not container.streams.video:
        raise VideoError(f"video {path} has no video stream (an audio file, or truncated)")
    name = container.format.name  # ffmpeg reads a still image as a one-frame video
    if name == "image2" or name.endswith("_pipe"):
        raise VideoError(f"{path} is an image ({name}), not a video: pass it as an image")
    stream = container.streams.video[0]
    cap = pixel_cap(max_pixels)
    if stream.width * stream.height > cap:
        raise VideoError(f"video {path} is {stream.width}x{stream.height} = "
                         f"{stream.width * stream.height} pixels a frame, over the cap of {cap} "
                         "(FASTVLM_MAX_PIXELS / --max-pixels)")
    start = _seconds(stream.start_time, stream.time_base) or 0.0
    duration = (_declared_duration(container, stream)
                or _scanned_duration(av, path, start))
    if not duration:
        raise VideoError(f"video {path} has no frames")
    positions = sample_positions(duration, frames, fps)
    rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    # The most frames the positions can give: one per position, one per frame of the video.
    known = stream.frames or (math.ceil(duration * rate) if rate else 0)
    most = min(len(positions), known) if known else len(positions)
    if max_frames is not None and most > max_frames:
        raise FrameLimitError(most, max_frames)
    stream.thread_type = "AUTO"
    images, timestamps = _decode(av, container, stream, path, start, duration, rate, positions,
                                 max_frames)
    return images, timestamps, duration, positions


def _decode(av, container, stream, path, start, duration, rate, positions, max_frames):
    """The frames shown at POSITIONS (ascending), each once, decoding in presentation order;
    frames past MAX_FRAMES are counted, not kept."""
    interval = 1 / rate if rate else 0.0
    images: List[Image.Image] = []
    timestamps: List[float] = []
    n_kept = 0

    def keep(t, frame):
        nonlocal n_kept
        n_kept += 1
        if max_frames is None or n_kept <= max_frames:
            images.append(frame.to_image())
            timestamps.append(t)

    shown = None  # (time, frame): the latest frame decoded, shown until the next one starts
    remaining = iter(positions)
    position = next(remaining)
    try:
        for frame in container.decode(stream):
            if frame.time is not None:
                t = float(frame.time) - start
            else:  # no timestamp: one frame interval after the previous one
                t = shown[0] + interval if shown else 0.0
            if shown is not None and position < t:
                # The positions before this frame's start are shown the previous frame (a
                # position before the first frame takes the first).
                keep(*shown)
                while position is not None and position < t:
                    position = next(remaining, None)
                if position is None:
                    break
            shown = (t, frame)
    except av.error.FFmpegError as e:
        at = f" after {shown[0]:.2f} s" if shown else ""
        raise VideoError(f"cannot decode video {path}{at}: {e.strerror or type(e).__name__} "
                         "(truncated or damaged)") from None
    if position is not None:
        if shown is None:
            raise VideoError(f"video {path} has no frames")
        # The last frame is shown for one frame interval. A position more than another interval
        # past that is past the end of what could be decoded (a declared duration a little
        # longer than the frames is common and harmless).
        # (Without a frame rate this cannot be told.)
        end = shown[0] + interval
        if interval and positions[-1] >= end + interval:
            raise VideoError(f"video {path} is truncated or damaged: its frames end at {end:.2f} s "
                             f"of the {duration:.2f} s it declares")
        keep(*shown)
    if max_frames is not None and n_kept > max_frames:
        raise FrameLimitError(n_kept, max_frames)
    return images, timestamps

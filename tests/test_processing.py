"""Image inputs: paths, URLs (timeout, size cap), PIL images, arrays; EXIF; modes; bad files."""

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx.processing import InputError, image_digest, preprocess_image, to_pil
from reference import closed_port


def png_bytes(w=60, h=40, seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """A local HTTP server: /ok.png, /big.png (a large body), /missing (404), /slow (no answer)."""
    body, big = png_bytes(), png_bytes(400, 400, seed=1)
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                release.wait(5)
                return
            data = {"/ok.png": body, "/big.png": big}.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", body
    release.set()
    httpd.shutdown()


def test_url_image_equals_the_file(server, tmp_path):
    base, body = server
    (tmp_path / "ok.png").write_bytes(body)
    assert image_digest(to_pil(base + "/ok.png")) == image_digest(to_pil(tmp_path / "ok.png"))


def test_url_size_cap_404_timeout_and_refused(server, monkeypatch):
    base, _ = server
    with pytest.raises(InputError, match="cap"):
        to_pil(base + "/big.png", max_bytes=1000)
    monkeypatch.setenv("FASTVLM_MAX_URL_BYTES", "1000")
    with pytest.raises(InputError, match="cap"):
        to_pil(base + "/big.png")
    with pytest.raises(InputError, match="404"):
        to_pil(base + "/missing")
    with pytest.raises(InputError, match="cannot fetch"):
        to_pil(base + "/slow", timeout=0.5)
    with pytest.raises(InputError, match="cannot fetch"):
        to_pil(f"http://127.0.0.1:{closed_port()}/x.png")


def test_bad_files(tmp_path):
    data = png_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\x00junk" * 50)
    with pytest.raises(InputError, match="empty"):
        to_pil(tmp_path / "empty.png")
    with pytest.raises(InputError, match="truncated"):
        to_pil(tmp_path / "trunc.png")
    with pytest.raises(InputError, match="not a supported image"):
        to_pil(tmp_path / "junk.jpg")
    with pytest.raises(InputError, match="not found"):
        to_pil(tmp_path / "nope.png")


def test_pixel_cap(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png_bytes(60, 40))
    assert to_pil(tmp_path / "a.png", max_pixels=2400).size == (60, 40)
    with pytest.raises(InputError, match="over the cap of 2399"):
        to_pil(tmp_path / "a.png", max_pixels=2399)
    monkeypatch.setenv("FASTVLM_MAX_PIXELS", "100")
    for image in (tmp_path / "a.png", np.zeros((40, 60, 3), np.uint8), Image.new("RGB", (60, 40))):
        with pytest.raises(InputError, match="pixel cap|over the cap"):
            to_pil(image)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    im = to_pil(tmp_path / "r.jpg")
    assert im.size == (40, 60)
    top = np.asarray(im)[:10].mean()
    assert top > 200  # the left band is now on top


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK", "1"])
def test_every_mode_becomes_rgb(mode):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    im = im.convert("L").convert(mode) if mode == "I;16" else im.convert(mode)
    out = to_pil(im)
    assert out.mode == "RGB" and out.size == (8, 8)
    assert preprocess_image(im, 64).shape == (64, 64, 3)


def test_arrays_and_digests():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    f32 = u8.astype(np.float32) / 255.0
    assert image_digest(to_pil(u8)) == image_digest(to_pil(f32)) == image_digest(Image.fromarray(u8))
    other = u8.copy()
    other[0, 0, 0] ^= 1
    assert image_digest(to_pil(other)) != image_digest(to_pil(u8))
    # The same bytes at another shape are another image.
    assert image_digest(to_pil(u8.reshape(30, 20, 3))) != image_digest(to_pil(u8))
    with pytest.raises(InputError):
        to_pil(np.zeros((4, 4, 3), np.int64))

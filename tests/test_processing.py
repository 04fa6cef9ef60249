"""Image inputs: paths, URLs (timeout, size cap), PIL images, arrays; bad files; the decoding
rules (EXIF, transparency, bit depth, every mode) pinned by pixel values."""

import http.server
import io
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from fastvlm_mlx.processing import InputError, image_digest, preprocess_image, to_pil
from reference import LocalHTTP, closed_port, drip


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


def test_a_url_fetch_has_a_total_deadline(monkeypatch):
    """The timeout bounds the whole fetch, not each read: a body that drips one byte every 0.1 s
    (each read well within the timeout) is cut off at the deadline, given as an argument or as
    FASTVLM_URL_TIMEOUT (generate's)."""
    web = LocalHTTP({"/drip": drip(seconds=8)})
    try:
        for how in ("argument", "environment"):
            t0 = time.monotonic()
            with pytest.raises(InputError, match="longer than 1 s"):
                if how == "argument":
                    to_pil(web.url("/drip"), timeout=1)
                else:
                    monkeypatch.setenv("FASTVLM_URL_TIMEOUT", "1")
                    to_pil(web.url("/drip"))
            assert time.monotonic() - t0 < 2.5, how
    finally:
        web.close()


def test_paths_that_are_not_image_files_say_what_they_are(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "sock"))
    try:
        for path, words in [(fifo, "named pipe (FIFO)"), ("/dev/zero", "a device"),
                            (tmp_path, "a directory"), (loop, "symlink loop"),
                            (tmp_path / "sock", "a socket"), (tmp_path / "nope.png", "not found")]:
            with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
                to_pil(path)
    finally:
        listening.close()


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


# --- decoding rules, by value (README, "Image decoding") ---------------------------------------

# A 4x3 grid of flat 8x8 blocks, twelve colours at least 100 levels apart in some channel, so each
# of the eight orientations gives another array. Flat blocks on JPEG's 8x8 grid at quality 100
# without chroma subsampling keep only the DC term, quantized with step 1: the round trip is off
# by the YCbCr rounding only (1 level measured), so 3 levels of tolerance still tell a wrong
# orientation (100+ levels) apart.
GRID_COLOURS = [(r, g, b) for r in (30, 220) for g in (30, 130, 230) for b in (30, 220)]
JPEG_TOL = 3
# Displayed image from the stored one, per EXIF orientation (TIFF/EXIF 2.32, tag 0x0112).
ORIENTED = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored turned 90 degrees anticlockwise: shown turned clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def grid_pattern():
    arr = np.zeros((24, 32, 3), np.uint8)
    for i, colour in enumerate(GRID_COLOURS):
        arr[(i // 4) * 8:(i // 4) * 8 + 8, (i % 4) * 8:(i % 4) * 8 + 8] = colour
    return arr


def saved(tmp_path, image, name, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def rgb(image):
    return np.asarray(to_pil(image), dtype=np.int64)


def over_white(colour, alpha):
    """Straight-alpha blending onto white, exactly; PIL's alpha_composite works in 8-bit fixed
    point, so its result may differ from this by rounding, at most 1 level."""
    colour, alpha = np.asarray(colour, np.float64), np.asarray(alpha, np.float64)[..., None]
    return (colour * alpha + 255.0 * (255.0 - alpha)) / 255.0


@pytest.mark.parametrize("orientation", [3, 6, 8, 2, 4, 5, 7])
def test_exif_orientation_is_applied(tmp_path, orientation):
    arr = grid_pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(tmp_path, Image.fromarray(arr), "r.jpg", exif=exif, quality=100, subsampling=0)
    assert np.abs(np.asarray(Image.open(path), np.int64) - arr).max() <= JPEG_TOL  # stored as is
    expected = ORIENTED[orientation](arr).astype(np.int64)
    out = rgb(path)
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= JPEG_TOL


def test_a_broken_exif_block_decodes_unrotated(tmp_path):
    arr = grid_pattern()
    broken = b"Exif\x00\x00" + b"XXXX" + bytes(8)  # an APP1 segment with no valid TIFF header
    path = saved(tmp_path, Image.fromarray(arr), "b.jpg", exif=broken, quality=100, subsampling=0)
    with Image.open(path) as im:
        im.load()
        with pytest.raises(SyntaxError):  # what to_pil must survive
            ImageOps.exif_transpose(im.copy())
    assert np.abs(rgb(path) - arr).max() <= JPEG_TOL
    assert np.abs(rgb(Image.open(path)) - arr).max() <= JPEG_TOL


@pytest.mark.parametrize("under", [(255, 255, 255), (0, 0, 0)], ids=["white-under", "black-under"])
def test_transparency_is_composited_onto_white(tmp_path, under):
    """Transparent pixels become white whatever RGB the encoder stored under them (Apple's
    convert('RGB') would show that RGB); half-transparent ones are blended onto white."""
    alphas = np.array([0, 1, 64, 128, 192, 254, 255], np.uint8)
    colours = np.array([(10, 20, 30), (200, 100, 0), (0, 0, 0), (40, 80, 160),
                        (255, 0, 255), (7, 7, 7), (90, 180, 45)], np.uint8)
    colours[alphas == 0] = under
    rgba = np.concatenate([colours, alphas[:, None]], axis=1).reshape(1, -1, 4)
    path = saved(tmp_path, Image.fromarray(rgba), "t.png")
    out = rgb(path)[0]
    expected = over_white(colours, alphas)
    assert np.abs(out - expected).max() <= 1
    assert (out[alphas == 0] == 255).all()  # exactly white, not the stored RGB
    assert (out[alphas == 255] == colours[alphas == 255]).all()  # opaque pixels untouched
    assert np.abs(rgb(rgba)[0] - expected).max() <= 1  # an HxWx4 array: the same rule


def test_transparent_pixels_are_white_but_the_square_padding_stays_black():
    rgba = np.zeros((2, 4, 4), np.uint8)  # wide, fully transparent, black under the alpha
    pixels = preprocess_image(Image.fromarray(rgba), 4)  # padded to 4x4, rows 1-2 the image
    assert (pixels[1:3] == 1.0).all()
    assert (pixels[0] == 0.0).all() and (pixels[3] == 0.0).all()


PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (17, 34, 51)], np.uint8)
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)


def palette_image():
    im = Image.new("P", (4, 2))
    im.putpalette(PALETTE.reshape(-1).tolist())
    im.putdata(INDICES.reshape(-1).tolist())
    return im


@pytest.mark.parametrize("transparency", [None, 1, bytes([255, 0, 128, 255])],
                         ids=["opaque", "index-1", "alpha-per-entry"])
def test_palette_png(tmp_path, transparency):
    options = {} if transparency is None else {"transparency": transparency}
    path = saved(tmp_path, palette_image(), "p.png", **options)
    assert Image.open(path).mode == "P"
    alpha = np.full(len(PALETTE), 255)
    if isinstance(transparency, int):
        alpha[transparency] = 0
    elif transparency is not None:
        alpha = np.frombuffer(transparency, np.uint8).astype(np.int64)
    expected = over_white(PALETTE[INDICES], alpha[INDICES])
    out = rgb(path)
    assert np.abs(out - expected).max() <= 1
    opaque = alpha[INDICES] == 255
    assert (out[opaque] == PALETTE[INDICES][opaque]).all()  # exact palette colours
    assert (out[alpha[INDICES] == 0] == 255).all()


SIXTEEN_BIT = np.array([[0, 1, 128, 129, 256, 257, 32767, 32768],
                        [32896, 65278, 65279, 65407, 65408, 65534, 65535, 4369]], np.uint16)


def scaled_to_8_bit(samples):
    return np.round(samples.astype(np.float64) * 255 / 65535).astype(np.int64)


def test_a_16_bit_grayscale_png_is_scaled(tmp_path):
    ramp = np.linspace(0, 65535, 8 * 32).round().astype(np.uint16).reshape(8, 32)
    for samples in (SIXTEEN_BIT, ramp):
        path = saved(tmp_path, Image.fromarray(samples), "g16.png")
        assert Image.open(path).mode in ("I;16", "I")  # 16 bits on disk and in memory
        out = rgb(path)
        expected = scaled_to_8_bit(samples)
        assert (out == expected[..., None]).all(), (out[..., 0], expected)


def test_a_16_bit_grayscale_colour_key_is_transparent(tmp_path):
    path = saved(tmp_path, Image.fromarray(SIXTEEN_BIT), "k16.png", transparency=32768)
    expected = scaled_to_8_bit(SIXTEEN_BIT)
    expected[SIXTEEN_BIT == 32768] = 255
    assert (rgb(path) == expected[..., None]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
def test_every_16_bit_mode_is_scaled(mode):
    if mode == "I":
        im = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    else:
        order = ">" if mode == "I;16B" else "<"
        im = Image.frombytes(mode, SIXTEEN_BIT.shape[::-1], SIXTEEN_BIT.astype(order + "u2").tobytes())
    assert im.mode == mode
    assert (rgb(im) == scaled_to_8_bit(SIXTEEN_BIT)[..., None]).all()


def png_16_bit(samples, colour_type):
    """A 16-bit PNG written by hand: Pillow cannot save 16-bit RGB(A). colour_type 2 = RGB, 6 = RGBA."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png(tmp_path):
    """Pillow opens 16-bit RGB as 8-bit RGB, keeping the high byte: within 1 level of the scaled
    value, and equal to it for 8-bit data stored as 16 bits (v = 257 x)."""
    samples = np.stack([SIXTEEN_BIT, SIXTEEN_BIT[:, ::-1], np.full_like(SIXTEEN_BIT, 257 * 77)], -1)
    (tmp_path / "c16.png").write_bytes(png_16_bit(samples, 2))
    out = rgb(tmp_path / "c16.png")
    assert np.abs(out - scaled_to_8_bit(samples)).max() <= 1
    assert (out[..., 2] == 77).all()
    assert out[0, 7, 0] == 128 and out[1, 6, 0] == 255  # mid-grey and white stay so


def test_a_16_bit_rgba_png_is_composited_onto_white(tmp_path):
    colour = np.array([[[0, 0, 0], [65535, 0, 0], [0, 0, 65535]]], np.uint16)
    alpha = np.array([[0, 65535, 32896]], np.uint16)  # transparent, opaque, half (128 * 257)
    (tmp_path / "a16.png").write_bytes(png_16_bit(np.concatenate([colour, alpha[..., None]], -1), 6))
    out = rgb(tmp_path / "a16.png")[0]
    assert (out[0] == 255).all() and tuple(out[1]) == (255, 0, 0)
    assert np.abs(out[2] - over_white([0, 0, 255], 128)).max() <= 1


def test_float_samples_are_clipped_and_rounded():
    samples = np.array([[-5.0, 0.4, 0.6, 127.4, 127.6, 254.6, 300.0, np.nan]], np.float32)
    out = rgb(Image.fromarray(samples))
    assert (out == np.array([0, 0, 1, 127, 128, 255, 255, 0])[None, :, None]).all()


GREY = np.array([[0, 1, 77, 128, 254, 255]], np.uint8)


def test_l_is_grey():
    assert (rgb(Image.fromarray(GREY)) == GREY[..., None]).all()


def test_la_is_blended_onto_white():
    alpha = np.array([[255, 0, 128, 64, 255, 0]], np.uint8)
    out = rgb(Image.fromarray(np.stack([GREY, alpha], -1)))
    assert np.abs(out - over_white(np.repeat(GREY[..., None], 3, -1), alpha)).max() <= 1
    assert out[0, 0].tolist() == [0] * 3 and out[0, 1].tolist() == [255] * 3  # opaque, transparent


def test_colour_keys_are_transparent():
    keyed = Image.fromarray(GREY)
    keyed.info["transparency"] = 77  # L: this grey is transparent
    assert (rgb(keyed)[0, :, 0] == [0, 1, 255, 128, 254, 255]).all()
    keyed = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6], [4, 5, 7]]], np.uint8))
    keyed.info["transparency"] = (4, 5, 6)  # RGB: this colour is transparent
    assert rgb(keyed).tolist() == [[[1, 2, 3], [255, 255, 255], [4, 5, 7]]]


def test_cmyk_takes_pillows_conversion():
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 25, 100],
                      [200, 200, 200, 200], [10, 128, 240, 30]]], np.uint8)
    # Pillow's formula (since its PR #2699, 2017): R = (255 - C)(255 - K) / 255, rounded; G from M, B from Y.
    expected = np.round((255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0)
    assert (rgb(Image.fromarray(cmyk, "CMYK")) == expected).all()


def test_1_bit_is_black_and_white():
    bits = np.array([[0, 1, 1, 0, 1]], bool)
    assert (rgb(Image.fromarray(bits))[0, :, 0] == [0, 255, 255, 0, 255]).all()


def test_a_mode_without_an_rgb_conversion_is_one_line():
    with pytest.raises(InputError, match="cannot convert an image of mode La to RGB"):
        to_pil(Image.new("La", (2, 2)))  # premultiplied alpha: Pillow converts it to LA only


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

#!/usr/bin/env python3
"""Thumbnail generation time: mxcas against Synapse's media repository, same requests.

For two sources -- a 12-megapixel photo-like JPEG (4000x3000, quality 85) and an animated GIF
(480x270, 60 frames), both generated here deterministically with Pillow -- and for each of the
five sizes the Matrix spec asks servers to produce (32x32 crop, 96x96 crop, 320x240 scale,
640x480 scale, 800x600 scale), it uploads a fresh copy of the source (one byte string in a JPEG
or GIF comment differs, so neither a content-addressed store nor a thumbnail cache has seen it)
and times the first thumbnail request for that size, which must generate it ("cold"), then the
same request again ("warm", served from what the first one stored). Median over --reps copies.

Every answer is checked before its time counts: 200, an image/* type that matches what Pillow
decodes (all frames), dimensions per the spec's rules (no upscaling; "crop" has the requested
aspect and at least the requested size where the source allows; "scale" keeps the source's
aspect and reaches the box in at least one dimension; a source smaller than the box comes back
at its own size), and, for the GIF with animated=true, an animated answer. The "output" column
names the shape: exact; fit (inside the box, one side on it -- what Synapse does); cover (both
sides at least the box's -- the spec's literal "never smaller than requested"); larger (both
sides past it: allowed, but not the work asked for); source size; source-limited.

What Synapse 1.163 does (synapse/media/media_repository.py, thumbnailer.py, rest/client/media.py):
an upload awaits _generate_thumbnails for every `thumbnail_sizes` entry (default: the five
above) before it answers -- JPEG thumbnails of a JPEG, PNG of a GIF or PNG, plus an animated
WebP per size for an animated source. With `dynamic_thumbnails` a thumbnail request looks for a
stored one of exactly the requested width, height, method and type -- type image/png, or
image/webp with animated=true, whatever the source -- and otherwise generates that one in a
thread (Pillow: full decode, LANCZOS, PNG, or WebP quality 80 of every frame), stores it and
serves the file; "scale" fits inside the box and never exceeds the source. Hence this config.

Targets:
  synapse  started here on loopback from a generated config (its media repository on,
           `dynamic_thumbnails: true`, `thumbnail_sizes: []`; see synapse_config below for why)
           and stopped on exit;
  mxcas    optional, an already running server: --mxcas-url URL --mxcas-token TOKEN (the
           same Matrix endpoints; the same code path as Synapse's from here on).

Prints a table, then one JSON line; with both targets, the ratio mxcas/Synapse per source.
Times are wall-clock milliseconds seen by this client on loopback. "srv cpu" is the server
process's CPU time over the request (/proc/PID/stat; 10 ms ticks), known for the Synapse
started here and for mxcas with --mxcas-pid: it moves less than wall time when something
else is using the cores.

Run it with the Python of Synapse's venv (it imports Pillow and yaml):
    scripts/bench-thumbnails.sh [--reps N] [--mxcas-url URL --mxcas-token TOKEN [--mxcas-pid PID]]
"""

import argparse
import http.client
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFilter

# (width, height, method): the sizes the spec says servers SHOULD produce.
SIZES = [(32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (640, 480, "scale"), (800, 600, "scale")]

# A fixed-length marker in each source's comment; every upload replaces it with a unique tag of
# the same length, so the image decodes identically but the bytes (and so any CID) differ.
MARKER = b"mxcas-bench-" + b"0" * 16

# Pillow's format name for each content type a thumbnail may have.
FORMAT_OF_TYPE = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/apng": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/avif": "AVIF",
}


class BenchError(Exception):
    """A target answered something that is not a measurement (an error, a wrong image)."""


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    key: str  # "jpeg" | "gif"
    content_type: str
    filename: str
    data: bytes
    width: int
    height: int
    frames: int
    description: str

    def variant(self, tag: bytes) -> bytes:
        assert len(tag) == len(MARKER)
        return self.data.replace(MARKER, tag, 1)


def _random_field(rnd: random.Random, w: int, h: int, cw: int, ch: int) -> Image.Image:
    """Random RGB values on a cw x ch grid, smoothly interpolated up to w x h."""
    return Image.frombytes("RGB", (cw, ch), rnd.randbytes(cw * ch * 3)).resize((w, h), Image.BICUBIC)


def make_photo(w: int = 4000, h: int = 3000, seed: int = 1) -> Source:
    """A JPEG that costs what a photo costs to decode and compresses like one.

    A flat gradient is the wrong test: it compresses to almost nothing and its DCT blocks are
    trivial. Natural scenes have detail at every scale with amplitude falling with frequency, so
    this sums random fields from 6x4 up to 1/6 of full resolution, lays translucent soft-edged
    shapes (objects) and a lighting falloff over them, and adds full-resolution sensor grain.
    """
    rnd = random.Random(seed)
    img = _random_field(rnd, w, h, 6, 4)
    for div, weight in ((400, 0.35), (100, 0.3), (25, 0.22), (6, 0.2)):
        img = Image.blend(img, _random_field(rnd, w, h, w // div, h // div), weight)
    layer = img.copy()
    draw = ImageDraw.Draw(layer)
    for _ in range(120):
        x, y, r = rnd.randrange(w), rnd.randrange(h), rnd.randrange(30, 500)
        colour = tuple(rnd.randrange(256) for _ in range(3))
        kind = rnd.random()
        if kind < 0.4:
            draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colour)
        elif kind < 0.7:
            draw.rectangle((x, y, x + r * 1.5, y + r), fill=colour)
        else:
            draw.polygon([(x + rnd.randrange(-r, r), y + rnd.randrange(-r, r)) for _ in range(5)], fill=colour)
    img = Image.blend(img, layer.filter(ImageFilter.GaussianBlur(2)), 0.55)
    img = Image.blend(img, Image.radial_gradient("L").resize((w, h), Image.BICUBIC).convert("RGB"), 0.15)
    img = Image.blend(img, Image.frombytes("L", (w, h), rnd.randbytes(w * h)).convert("RGB"), 0.07)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, comment=MARKER)
    data = out.getvalue()
    assert data.count(MARKER) == 1
    return Source("jpeg", "image/jpeg", "photo.jpg", data, w, h, 1,
                  f"photo-like JPEG {w}x{h} q85 ({w * h / 1e6:.0f} MP)")


def make_gif(w: int = 480, h: int = 270, frames: int = 60, seed: int = 2) -> Source:
    """An animated GIF whose frames all differ (an encoder may merge identical ones)."""
    rnd = random.Random(seed)
    red_ramp = Image.linear_gradient("L").resize((w, h))
    green_ramp = Image.linear_gradient("L").rotate(90).resize((w, h))
    balls = [(rnd.randrange(w), rnd.randrange(h), rnd.uniform(-6, 6), rnd.uniform(-4, 4), rnd.randrange(10, 50),
              tuple(rnd.randrange(256) for _ in range(3))) for _ in range(12)]
    images = []
    for i in range(frames):
        blue = Image.new("L", (w, h), 128 + int(100 * math.sin(2 * math.pi * i / frames)))
        im = Image.merge("RGB", (red_ramp.point(lambda v, i=i: (v + 4 * i) % 256), green_ramp, blue))
        draw = ImageDraw.Draw(im)
        for x, y, vx, vy, r, colour in balls:
            cx, cy = (x + vx * i) % w, (y + vy * i) % h
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(0, 0, 0), width=2)
        draw.text((10, 10), f"frame {i:02d}", fill=(255, 255, 255))
        images.append(im.quantize(256, method=Image.Quantize.FASTOCTREE))
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=40, loop=0, comment=MARKER)
    data = out.getvalue()
    assert data.count(MARKER) == 1
    return Source("gif", "image/gif", "anim.gif", data, w, h, frames,
                  f"animated GIF {w}x{h}, {frames} frames at 40 ms")


# ---------------------------------------------------------------------------------------------
# Checking an answer


def dims_verdict(src: Source, w: int, h: int, method: str, ow: int, oh: int) -> tuple[str | None, str]:
    """(problem or None, shape label) for an ow x oh answer to a w x h `method` request."""
    sw, sh = src.width, src.height
    if ow > sw or oh > sh:
        return f"{ow}x{oh} is larger than the {sw}x{sh} source (servers MUST NOT upscale)", "upscaled"
    if (ow, oh) == (sw, sh) and sw <= w and sh <= h:
        return None, "source size"
    if method == "crop":
        # Requested aspect within a pixel of rounding.
        if abs(ow * h - oh * w) > max(w, h):
            return f"{ow}x{oh} does not have the requested {w}:{h} aspect", "wrong aspect"
        if sw >= w and sh >= h:
            if ow < w or oh < h:
                return f"{ow}x{oh} is smaller than the requested {w}x{h}", "too small"
            return None, "exact" if (ow, oh) == (w, h) else "larger"
        # The source cannot give w x h without upscaling: the largest crop of that aspect.
        cw, ch = min(sw, sh * w / h), min(sh, sw * h / w)
        if ow < int(cw) - 1 or oh < int(ch) - 1:
            return f"{ow}x{oh} is smaller than the largest {w}:{h} crop of the source", "too small"
        return None, "source-limited"
    # scale: the source's aspect within a pixel of rounding.
    if abs(ow * sh - oh * sw) > max(sw, sh):
        return f"{ow}x{oh} does not keep the source's {sw}:{sh} aspect", "wrong aspect"
    if sw <= w and sh <= h:
        return f"{ow}x{oh}: the source fits the box, so it should come back at {sw}x{sh}", "too small"
    if ow < min(w, sw) - 1 and oh < min(h, sh) - 1:
        return f"{ow}x{oh} reaches neither side of the requested {w}x{h}", "too small"
    fits = ow <= w and oh <= h
    covers = ow >= min(w, sw) - 1 and oh >= min(h, sh) - 1
    if fits and covers:
        return None, "exact"
    if fits:
        return None, "fit"
    # Allowed ("at least the requested size"), but not a thumbnail of the box any more.
    return None, "larger" if ow > w + 1 and oh > h + 1 else "cover"


def inspect(src: Source, size: tuple[int, int, str], animated: bool, status: int, ctype: str, body: bytes) -> dict:
    """Checks that an answer is a real thumbnail of `src`; returns what it is."""
    w, h, method = size
    if status != 200:
        raise BenchError(f"HTTP {status}: {body[:300]!r}")
    ctype = ctype.split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise BenchError(f"content type {ctype!r} is not an image: {body[:200]!r}")
    try:
        im = Image.open(io.BytesIO(body))
        frames = getattr(im, "n_frames", 1)
        for i in range(frames):
            im.seek(i)
            im.load()
    except Exception as e:  # noqa: BLE001 -- any decoder failure means a broken answer
        raise BenchError(f"{len(body)} bytes of {ctype} that Pillow cannot decode: {e}") from e
    if FORMAT_OF_TYPE.get(ctype) not in (None, im.format):
        raise BenchError(f"content type {ctype} but the bytes are {im.format}")
    ow, oh = im.size
    problem, shape = dims_verdict(src, w, h, method, ow, oh)
    if problem:
        raise BenchError(f"{w}x{h} {method}: {problem}")
    if animated and src.frames > 1 and frames < 2:
        raise BenchError(f"asked animated=true of a {src.frames}-frame GIF and got a static {im.format}; its time "
                         f"would not be comparable (--no-animated benchmarks static thumbnails of the GIF)")
    if not animated and frames > 1:
        raise BenchError(f"asked animated=false and got {frames} frames (the spec: MUST NOT animate)")
    return {"type": ctype, "format": im.format, "bytes": len(body), "width": ow, "height": oh,
            "frames": frames, "shape": shape}


# ---------------------------------------------------------------------------------------------
# Talking to a target


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the ")" that ends the command name; utime and stime are 14 and 15.
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Target:
    """One media repository, spoken to over one keep-alive connection."""

    def __init__(self, name: str, url: str, token: str, pid: int | None = None):
        self.name, self.token, self.pid = name, token, pid
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"error: {name}: {url!r} is not an http(s) URL")
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname, u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=120)
        conn.connect()
        # Small requests must not wait for delayed ACKs.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str, bytes, float, float | None]:
        """(status, content type, body, wall ms, server CPU ms or None)."""
        headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect()
            cpu0 = _cpu_seconds(self.pid)
            t0 = time.perf_counter()
            try:
                self._conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed while idle: once more on a new one.
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
                continue
            ms = (time.perf_counter() - t0) * 1000
            cpu1 = _cpu_seconds(self.pid)
            # http.client returns short bodies silently when the server closes early.
            length = resp.getheader("Content-Length")
            if length is not None and int(length) != len(data):
                raise BenchError(f"{method} {path}: {len(data)} of {length} bytes before the server closed")
            if resp.getheader("Connection", "").lower() == "close":
                self._conn.close()
                self._conn = None
            cpu_ms = (cpu1 - cpu0) * 1000 if cpu0 is not None and cpu1 is not None else None
            return resp.status, resp.getheader("Content-Type", ""), data, ms, cpu_ms
        raise AssertionError("unreachable")

    def upload(self, src: Source, data: bytes) -> tuple[str, str, float]:
        """(server name, media id, wall ms) of a new upload."""
        status, _, body, ms, _ = self.request(
            "POST", f"/_matrix/media/v3/upload?filename={src.filename}", data, {"Content-Type": src.content_type})
        if status != 200:
            raise BenchError(f"{self.name}: upload answered {status}: {body[:300]!r}")
        uri = json.loads(body)["content_uri"]
        if not uri.startswith("mxc://"):
            raise BenchError(f"{self.name}: upload answered content_uri {uri!r}")
        server, media_id = uri[len("mxc://"):].split("/", 1)
        return server, media_id, ms

    def thumbnail(self, server: str, media_id: str, size: tuple[int, int, str], animated: bool):
        w, h, method = size
        q = urllib.parse.urlencode({"width": w, "height": h, "method": method,
                                    "animated": "true" if animated else "false"})
        return self.request("GET", f"/_matrix/client/v1/media/thumbnail/{server}/{media_id}?{q}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------------------------
# Synapse, started here


class Synapse:
    """A Synapse with its own media repository on, in a temp dir, on a free loopback port."""

    def __init__(self, python: str, keep: bool):
        self.python = python
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix="mxcas-bench-thumbs-")
        self.config = os.path.join(self.dir, "homeserver.yaml")
        self.proc: subprocess.Popen | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, args: list[str], what: str) -> None:
        out = subprocess.run(args, cwd=self.dir, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"error: {what} failed:\n{out.stdout}{out.stderr}")

    def synapse_config(self) -> None:
        import yaml  # comes with Synapse

        self._run([self.python, "-m", "synapse.app.homeserver", "--server-name", "localhost", "--config-path",
                   self.config, "--generate-config", "--report-stats=no", "--data-directory", self.dir],
                  "synapse --generate-config")
        with open(self.config) as f:
            c = yaml.safe_load(f)
        c["listeners"] = [{"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                           "resources": [{"names": ["client"], "compress": False}]}]
        c["enable_media_repo"] = True
        # Generate on request: with `dynamic_thumbnails` off Synapse only ever picks among the
        # thumbnails it made at upload.
        c["dynamic_thumbnails"] = True
        # No pregeneration: upload (create_or_update_content) awaits _generate_thumbnails for
        # every configured size before it answers, so with the default five sizes a cold
        # request for a crop would find its thumbnail already made and time a file read. (The
        # dynamic path matches stored thumbnails on requested width, height, method and type,
        # and asks for image/png, so pregenerated JPEG and aspect-fitted "scale" ones would not
        # match anyway -- but crops of a GIF would, and every upload would pay for all five.)
        c["thumbnail_sizes"] = []
        c["max_upload_size"] = "100M"
        c["trusted_key_servers"] = []
        c["suppress_key_server_warning"] = True
        c["report_stats"] = False
        c["enable_registration"] = False
        c["registration_shared_secret"] = "mxcas-bench-registration-secret"
        with open(self.config, "w") as f:
            yaml.safe_dump(c, f)

    def start(self) -> None:
        self.synapse_config()
        log = open(os.path.join(self.dir, "synapse.out"), "wb")
        # Its own session: a Ctrl-C in the terminal reaches this script, which stops Synapse.
        self.proc = subprocess.Popen([self.python, "-m", "synapse.app.homeserver", "-c", self.config],
                                     cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: Synapse exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"error: Synapse did not answer /health within 90 s:\n{self.log_tail()}")
            time.sleep(0.1)

    def user_token(self) -> str:
        password = "bench-password-0123456789"
        self._run([os.path.join(os.path.dirname(self.python), "register_new_matrix_user"), "-c", self.config,
                   "-u", "bench", "-p", password, "--no-admin", self.url], "register_new_matrix_user")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bench"}, "password": password}
        conn.request("POST", "/_matrix/client/v3/login", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
        if resp.status != 200:
            raise SystemExit(f"error: Synapse login: {resp.status} {answer}")
        return answer["access_token"]

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for name in ("synapse.out", "homeserver.log"):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    text += f"--- {name}\n" + "".join(f.readlines()[-lines:])
            except OSError:
                pass
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.keep:
            print(f"(kept Synapse's directory {self.dir})", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Measuring


def size_name(size: tuple[int, int, str]) -> str:
    return f"{size[0]}x{size[1]} {size[2]}"


@dataclass
class Tagger:
    """Unique same-length tags: a per-run nonce (so a long-lived mxcas that saw an earlier run
    has not seen these bytes either) and a counter."""

    nonce: str = field(default_factory=lambda: os.urandom(4).hex())
    n: int = 0

    def next(self) -> bytes:
        self.n += 1
        return f"mxcas-bench-{self.nonce}{self.n:08x}".encode()


def measure(target: Target, src: Source, reps: int, animated: bool, tagger: Tagger) -> dict:
    """Cold and warm thumbnail times of `src` on `target`, per size, checked."""
    anim = animated and src.frames > 1

    def one(size):
        server, media_id, up_ms = target.upload(src, src.variant(tagger.next()))
        status, ctype, body, cold_ms, cold_cpu = target.thumbnail(server, media_id, size, anim)
        try:
            info = inspect(src, size, anim, status, ctype, body)
        except BenchError as e:
            raise BenchError(f"{target.name}, {src.key}, {size_name(size)}, first request: {e}") from None
        status, ctype, wbody, warm_ms, _ = target.thumbnail(server, media_id, size, anim)
        try:
            winfo = inspect(src, size, anim, status, ctype, wbody)
        except BenchError as e:
            raise BenchError(f"{target.name}, {src.key}, {size_name(size)}, second request: {e}") from None
        if (winfo["width"], winfo["height"], winfo["type"]) != (info["width"], info["height"], info["type"]):
            raise BenchError(f"{target.name}, {src.key}, {size_name(size)}: the second answer "
                             f"({winfo['width']}x{winfo['height']} {winfo['type']}) differs from the first "
                             f"({info['width']}x{info['height']} {info['type']})")
        return up_ms, cold_ms, cold_cpu, warm_ms, info

    # One untimed round first: the first request of a kind loads codecs and warms caches.
    one(SIZES[1])
    runs = {size: [] for size in SIZES}
    # Sizes interleaved within each repetition, so a slow spell on the machine spreads over all.
    for _ in range(reps):
        for size in SIZES:
            runs[size].append(one(size))

    sizes = {}
    for size, rs in runs.items():
        cpus = [r[2] for r in rs if r[2] is not None]
        info = rs[-1][4]
        sizes[size_name(size)] = {
            "cold_ms": round(statistics.median(r[1] for r in rs), 1),
            "cold_ms_min": round(min(r[1] for r in rs), 1),
            "cold_ms_max": round(max(r[1] for r in rs), 1),
            "server_cpu_ms": round(statistics.median(cpus), 0) if cpus else None,
            "warm_ms": round(statistics.median(r[3] for r in rs), 1),
            "upload_ms": round(statistics.median(r[0] for r in rs), 1),
            **{k: info[k] for k in ("type", "format", "bytes", "width", "height", "frames", "shape")},
            # Output sizes can vary by a few bytes between copies (the tag is not in them, but an
            # encoder could embed metadata); report the range if so.
            "bytes_range": [min(r[4]["bytes"] for r in rs), max(r[4]["bytes"] for r in rs)],
        }
    cpu_values = [s["server_cpu_ms"] for s in sizes.values()]
    return {
        "animated": anim,
        "sizes": sizes,
        "sum_cold_ms": round(sum(s["cold_ms"] for s in sizes.values()), 1),
        "sum_warm_ms": round(sum(s["warm_ms"] for s in sizes.values()), 1),
        "sum_server_cpu_ms": None if None in cpu_values else round(sum(cpu_values), 0),
    }


def fmt_num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(sources: dict, results: dict) -> None:
    for key, src in sources.items():
        print(f"\n{src.description}: {len(src.data):,} bytes"
              + (", requested with animated=true" if any(results[t][key]["animated"] for t in results) else ""))
        print(f"  {'target':<8} {'size':<14} {'cold ms':>9} {'(min-max)':>15} {'srv cpu':>8} {'warm ms':>8}"
              f"  output")
        for tname, per_source in results.items():
            r = per_source[key]
            for sname, s in r["sizes"].items():
                lo, hi = s["bytes_range"]
                nbytes = f"{lo:,} B" if lo == hi else f"{lo:,}-{hi:,} B"
                frames = f", {s['frames']} frames" if s["frames"] > 1 else ""
                print(f"  {tname:<8} {sname:<14} {s['cold_ms']:>9.1f} {s['cold_ms_min']:>7.0f}-{s['cold_ms_max']:<7.0f}"
                      f" {fmt_num(s['server_cpu_ms'], '.0f'):>8} {s['warm_ms']:>8.1f}"
                      f"  {s['format']} ({s['type']}) {s['width']}x{s['height']} {s['shape']}{frames}, {nbytes}")
            print(f"  {tname:<8} {'sum of 5':<14} {r['sum_cold_ms']:>9.1f} {'':>15}"
                  f" {fmt_num(r['sum_server_cpu_ms'], '.0f'):>8} {r['sum_warm_ms']:>8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9, help="fresh uploads timed per size and source (median; default 9)")
    ap.add_argument("--mxcas-url", help="base URL of a running mxcas, e.g. http://127.0.0.1:8008")
    ap.add_argument("--mxcas-token", help="an access token mxcas accepts")
    ap.add_argument("--mxcas-pid", type=int, help="mxcas's process id, to report its CPU time per request")
    ap.add_argument("--no-synapse", action="store_true", help="measure only mxcas")
    ap.add_argument("--no-animated", action="store_true", help="request GIF thumbnails with animated=false")
    ap.add_argument("--only", choices=["jpeg", "gif"], help="one source only")
    ap.add_argument("--keep", action="store_true", help="keep Synapse's temp directory (config, logs, media)")
    args = ap.parse_args()
    if bool(args.mxcas_url) != bool(args.mxcas_token):
        ap.error("--mxcas-url and --mxcas-token go together")
    if args.no_synapse and not args.mxcas_url:
        ap.error("--no-synapse needs --mxcas-url")
    if args.reps < 1:
        ap.error("--reps must be at least 1")

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below stops Synapse and removes its dir.
    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)

    t_start = time.monotonic()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", file=sys.stderr)
    print("==> generating sources (deterministic)", file=sys.stderr)
    sources = {}
    if args.only in (None, "jpeg"):
        sources["jpeg"] = make_photo()
    if args.only in (None, "gif"):
        sources["gif"] = make_gif()
    for src in sources.values():
        print(f"    {src.description}: {len(src.data):,} bytes", file=sys.stderr)

    synapse = None
    targets: list[Target] = []
    results: dict = {}
    tagger = Tagger()
    try:
        if not args.no_synapse:
            import synapse as synapse_pkg  # only to name the version measured

            print(f"==> starting Synapse {synapse_pkg.__version__} (media repo on, dynamic thumbnails, "
                  "no pregenerated sizes)", file=sys.stderr)
            synapse = Synapse(sys.executable, args.keep)
            synapse.start()
            targets.append(Target("synapse", synapse.url, synapse.user_token(), synapse.proc.pid))
        if args.mxcas_url:
            targets.append(Target("mxcas", args.mxcas_url, args.mxcas_token, args.mxcas_pid))
        for target in targets:
            results[target.name] = {}
            for key, src in sources.items():
                print(f"==> {target.name}: {src.key}, {len(SIZES)} sizes x {args.reps} fresh uploads",
                      file=sys.stderr)
                try:
                    results[target.name][key] = measure(target, src, args.reps, not args.no_animated, tagger)
                except BenchError as e:
                    print(f"error: {e}", file=sys.stderr)
                    if synapse is not None and target.name == "synapse":
                        print(synapse.log_tail(), file=sys.stderr)
                    return 1
            target.close()
    finally:
        for target in targets:
            target.close()
        if synapse is not None:
            synapse.stop()

    print_table(sources, results)
    ratios = {}
    if "synapse" in results and "mxcas" in results:
        print("\nratio mxcas/Synapse (below 1: mxcas is faster)")
        for key in sources:
            m, s = results["mxcas"][key], results["synapse"][key]
            per_size = {n: round(m["sizes"][n]["cold_ms"] / s["sizes"][n]["cold_ms"], 3) for n in s["sizes"]}
            ratios[key] = {"sum_cold": round(m["sum_cold_ms"] / s["sum_cold_ms"], 3), "per_size_cold": per_size}
            print(f"  {key:<5} sum of cold times {ratios[key]['sum_cold']:.2f}   per size: "
                  + ", ".join(f"{n} {v:.2f}" for n, v in per_size.items()))
    elapsed = time.monotonic() - t_start
    print(f"\n(load average at end: {os.getloadavg()[0]:.2f}; {elapsed:.0f} s in all)")
    print(json.dumps({
        "bench": "thumbnails",
        "reps": args.reps,
        "sources": {k: {"description": s.description, "bytes": len(s.data), "width": s.width, "height": s.height,
                        "frames": s.frames} for k, s in sources.items()},
        "results": results,
        "ratio_mxcas_over_synapse": ratios or None,
    }, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A real Matrix client (matrix-nio, pinned in scripts/test.sh) used the way an app uses it,
against one URL only — the reverse proxy in front of the homeserver and mxcas:

  alice and bob log in; alice creates a room, invites bob, bob joins; alice uploads a JPEG
  (made here with Pillow) and a 5 MiB random file and sends them as m.image and m.file; bob
  syncs until he sees both events, downloads both through the authenticated v1 endpoints and
  compares their SHA-256 with what alice sent, then asks for two thumbnails of the image
  (96x96 crop, 320x240 scale) and checks them against the spec's size rules.

Prints one JSON summary on stdout (the steps passed, what each found, and the failure if any)
and exits 1 on the first failure, 2 on bad arguments. Run it with Synapse's venv python:

  python tests/clients/nio_flow.py --homeserver http://127.0.0.1:PORT --server-name localhost \\
      --alice alice:PASSWORD --bob bob:PASSWORD
"""

import argparse
import asyncio
import hashlib
import io
import json
import os
import sys
import time
from urllib.parse import urlparse

try:
    import nio
    from PIL import Image, ImageDraw
except ImportError as e:
    sys.exit(f"nio_flow: {e}: run it with the Synapse venv's python, where scripts/test.sh installs "
             "matrix-nio (Pillow comes with Synapse)")

IMAGE_SIZE = (1000, 600)
FILE_SIZE = 5 * 1024 * 1024
THUMBNAIL_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def status_of(resp):
    """The HTTP status behind a nio response (nio reports some non-2xx bodies as successes)."""
    transport = getattr(resp, "transport_response", None)
    return transport.status if transport is not None else None


def header(resp, name):
    transport = getattr(resp, "transport_response", None)
    return transport.headers.get(name) if transport is not None else None


def describe(resp):
    """A nio response for a failure message: its class, HTTP status and Matrix error."""
    parts = [type(resp).__name__, f"HTTP {status_of(resp)}"]
    for attr in ("status_code", "message"):
        if getattr(resp, attr, None):
            parts.append(f"{attr}={getattr(resp, attr)}")
    return " ".join(parts)


async def describe_body(resp):
    """`describe` plus the start of the body: nio turns a JSON error on a file endpoint into
    "invalid content type" and drops the errcode."""
    text = ""
    transport = getattr(resp, "transport_response", None)
    if transport is not None:
        try:
            text = (await transport.text())[:300]
        except Exception:  # noqa: BLE001 - the body is only a hint in a failure message
            pass
    return f"{describe(resp)} body={text!r}" if text else describe(resp)


def make_jpeg():
    """A photo-like JPEG: gradients and shapes, so resizing and cropping are visible."""
    w, h = IMAGE_SIZE
    img = Image.new("RGB", IMAGE_SIZE)
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = (x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 4, h // 4, w * 3 // 4, h * 3 // 4), fill=(240, 240, 20))
    draw.rectangle((10, 10, 110, 60), fill=(200, 20, 20))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def crop_rule(got, source, box):
    """crop: exactly the box, unless the source is smaller than it; never upscaled."""
    (w, h), (sw, sh), (bw, bh) = got, source, box
    if sw >= bw and sh >= bh:
        return (w, h) == (bw, bh), f"crop {bw}x{bh} of {sw}x{sh}: want exactly {bw}x{bh}"
    return w <= min(bw, sw) and h <= min(bh, sh), f"crop {bw}x{bh} of a smaller {sw}x{sh}: want no upscaling"


def scale_rule(got, source, box):
    """scale: the source's aspect ratio, inside the box with one side on it, never upscaled
    (a source that fits the box comes back at its own size)."""
    (w, h), (sw, sh), (bw, bh) = got, source, box
    if sw <= bw and sh <= bh:
        return (w, h) == (sw, sh), f"scale {bw}x{bh} of a smaller {sw}x{sh}: want {sw}x{sh}"
    factor = min(bw / sw, bh / sh)
    want = (sw * factor, sh * factor)
    fits = w <= bw and h <= bh and (w == bw or h == bh)
    aspect = abs(w - want[0]) <= 1 and abs(h - want[1]) <= 1
    return fits and aspect, f"scale {bw}x{bh} of {sw}x{sh}: want {round(want[0])}x{round(want[1])} (±1)"


class Flow:
    def __init__(self, args):
        self.args = args
        self.summary = {"ok": False, "homeserver": args.homeserver, "steps": []}
        self.clients = []

    def passed(self, step, **found):
        self.summary["steps"].append(step)
        if found:
            self.summary[step] = found

    async def login(self, credentials):
        user, _, password = credentials.partition(":")
        # nio retries connection errors and 429s forever by default: a few, then the failure.
        config = nio.AsyncClientConfig(max_timeouts=3, max_limit_exceeded=3)
        client = nio.AsyncClient(self.args.homeserver, f"@{user}:{self.args.server_name}", config=config)
        self.clients.append(client)
        resp = await client.login(password, device_name="mxcas nio_flow")
        check(isinstance(resp, nio.LoginResponse), f"login of {user}: {describe(resp)}")
        return client

    async def upload(self, client, data, content_type, filename):
        resp, _ = await client.upload(io.BytesIO(data), content_type=content_type, filename=filename,
                                      filesize=len(data))
        check(isinstance(resp, nio.UploadResponse), f"upload of {filename}: {describe(resp)}")
        prefix = f"mxc://{self.args.server_name}/"
        check(resp.content_uri.startswith(prefix), f"upload of {filename}: {resp.content_uri} is not {prefix}…")
        return resp.content_uri

    async def sync_until(self, client, since, room_id, event_ids):
        """Syncs from `since` until every one of `event_ids` is in the room's timeline; returns
        them by ID."""
        found = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            resp = await client.sync(timeout=5000, since=since)
            check(isinstance(resp, nio.SyncResponse), f"sync: {describe(resp)}")
            since = resp.next_batch
            room = resp.rooms.join.get(room_id)
            for event in room.timeline.events if room else []:
                if event.event_id in event_ids:
                    found[event.event_id] = event
            if len(found) == len(event_ids):
                return found
        raise Failure(f"bob's sync did not show events {sorted(set(event_ids) - set(found))} within 60 s")

    async def download(self, client, mxc, sent, filename=None):
        resp = await client.download(mxc=mxc, filename=filename)
        if not (isinstance(resp, nio.MemoryDownloadResponse) and status_of(resp) == 200):
            raise Failure(f"download of {mxc}: {await describe_body(resp)}")
        body = resp.body
        # Length first: a cut body would otherwise look like corrupt data.
        check(len(body) == len(sent), f"download of {mxc}: {len(body)} bytes, {len(sent)} were uploaded")
        check(sha256(body) == sha256(sent), f"download of {mxc}: SHA-256 differs from the upload")
        return {
            "bytes": len(body),
            "sha256": sha256(body),
            "content_type": resp.content_type,
            "filename": resp.filename,
            "content_disposition": header(resp, "Content-Disposition"),
        }

    async def thumbnail(self, client, mxc, box, method, rule):
        url = urlparse(mxc)
        resp = await client.thumbnail(url.netloc, url.path.lstrip("/"), box[0], box[1], method=method)
        status = status_of(resp)
        if not (isinstance(resp, nio.ThumbnailResponse) and status == 200):
            raise Failure(f"thumbnail {box[0]}x{box[1]} {method.value} of {mxc}: {await describe_body(resp)}")
        check(resp.content_type in THUMBNAIL_TYPES,
              f"thumbnail {method.value}: Content-Type {resp.content_type}, want one of {sorted(THUMBNAIL_TYPES)}")
        try:
            img = Image.open(io.BytesIO(resp.body))
            img.load()
        except Exception as e:  # noqa: BLE001 - any decoder error is the finding
            raise Failure(f"thumbnail {method.value}: Pillow cannot decode it ({e})") from e
        check(Image.MIME.get(img.format) == resp.content_type,
              f"thumbnail {method.value}: served as {resp.content_type}, bytes are {img.format}")
        ok, rule_text = rule(img.size, IMAGE_SIZE, box)
        check(ok, f"thumbnail got {img.size[0]}x{img.size[1]}; {rule_text}")
        return {"width": img.size[0], "height": img.size[1], "content_type": resp.content_type,
                "bytes": len(resp.body), "content_disposition": header(resp, "Content-Disposition")}

    async def run(self):
        alice = await self.login(self.args.alice)
        bob = await self.login(self.args.bob)
        self.passed("login", alice=alice.user_id, bob=bob.user_id)

        config = await alice.content_repository_config()
        check(isinstance(config, nio.ContentRepositoryConfigResponse), f"media config: {describe(config)}")
        check(config.upload_size is None or config.upload_size >= FILE_SIZE,
              f"media config: m.upload.size {config.upload_size} is below the {FILE_SIZE}-byte file")
        self.passed("media_config", upload_size=config.upload_size)

        room = await alice.room_create(name="mxcas real client")
        check(isinstance(room, nio.RoomCreateResponse), f"room creation: {describe(room)}")
        invite = await alice.room_invite(room.room_id, bob.user_id)
        check(isinstance(invite, nio.RoomInviteResponse), f"invite of bob: {describe(invite)}")
        joined = await bob.join(room.room_id)
        check(isinstance(joined, nio.JoinResponse), f"bob joining: {describe(joined)}")
        # Bob's first sync, before anything is sent: the events then come as new ones, never cut
        # off by a limited initial timeline.
        first = await bob.sync(timeout=0)
        check(isinstance(first, nio.SyncResponse), f"bob's first sync: {describe(first)}")
        self.passed("room", room_id=room.room_id)

        jpeg = make_jpeg()
        random_file = os.urandom(FILE_SIZE)
        image_mxc = await self.upload(alice, jpeg, "image/jpeg", "photo.jpg")
        file_mxc = await self.upload(alice, random_file, "application/octet-stream", "random.bin")
        self.passed("upload", image=image_mxc, file=file_mxc, image_bytes=len(jpeg), file_bytes=len(random_file))

        w, h = IMAGE_SIZE
        sent = []
        for content in (
            {"msgtype": "m.image", "body": "photo.jpg", "url": image_mxc,
             "info": {"mimetype": "image/jpeg", "size": len(jpeg), "w": w, "h": h}},
            {"msgtype": "m.file", "body": "random.bin", "url": file_mxc,
             "info": {"mimetype": "application/octet-stream", "size": len(random_file)}},
        ):
            resp = await alice.room_send(room.room_id, "m.room.message", content)
            check(isinstance(resp, nio.RoomSendResponse), f"sending {content['msgtype']}: {describe(resp)}")
            sent.append(resp.event_id)
        self.passed("send", events=sent)

        events = await self.sync_until(bob, first.next_batch, room.room_id, sent)
        image_event, file_event = events[sent[0]], events[sent[1]]
        check(isinstance(image_event, nio.RoomMessageImage), f"bob sees {type(image_event).__name__}, not m.image")
        check(isinstance(file_event, nio.RoomMessageFile), f"bob sees {type(file_event).__name__}, not m.file")
        check(image_event.sender == alice.user_id, f"m.image is from {image_event.sender}")
        self.passed("bob_sync", image=image_event.url, file=file_event.url)

        # Bob downloads what the events name, not what alice was told.
        image = await self.download(bob, image_event.url, jpeg)
        check(image["content_type"] == "image/jpeg", f"image served as {image['content_type']}, not image/jpeg")
        named = await self.download(bob, image_event.url, jpeg, filename="holiday.jpg")
        check(named["filename"] == "holiday.jpg",
              f"download with a filename: Content-Disposition {named['content_disposition']!r} "
              f"gives nio the filename {named['filename']!r}, not 'holiday.jpg'")
        data = await self.download(bob, file_event.url, random_file)
        self.passed("download", image=image, image_named=named, file=data)

        crop = await self.thumbnail(bob, image_event.url, (96, 96), nio.ResizingMethod.crop, crop_rule)
        self.passed("thumbnail_crop_96x96", **crop)
        scale = await self.thumbnail(bob, image_event.url, (320, 240), nio.ResizingMethod.scale, scale_rule)
        self.passed("thumbnail_scale_320x240", **scale)
        self.summary["ok"] = True

    async def close(self):
        for client in self.clients:
            await client.close()


async def main(args):
    flow = Flow(args)
    try:
        await asyncio.wait_for(flow.run(), timeout=args.timeout)
    except Failure as e:
        flow.summary["error"] = str(e)
    except asyncio.TimeoutError:
        flow.summary["error"] = f"the flow did not finish within {args.timeout} s"
    except Exception as e:  # noqa: BLE001 - a crash is reported like a failure, with its type
        flow.summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        await flow.close()
    if not flow.summary["ok"]:
        done = flow.summary["steps"]
        flow.summary["failed_after"] = done[-1] if done else None
    print(json.dumps(flow.summary, indent=2))
    if not flow.summary["ok"]:
        print(f"nio_flow: FAILED after step {flow.summary['failed_after']!r}: {flow.summary['error']}",
              file=sys.stderr)
        return 1
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--homeserver", required=True, help="the reverse proxy's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--server-name", required=True, help="the homeserver's server name (the mxc's)")
    p.add_argument("--alice", required=True, metavar="USER:PASSWORD", help="the uploader (an existing account)")
    p.add_argument("--bob", required=True, metavar="USER:PASSWORD", help="the downloader (an existing account)")
    p.add_argument("--timeout", type=float, default=240, help="seconds for the whole flow")
    args = p.parse_args()
    for who in (args.alice, args.bob):
        if ":" not in who:
            p.error(f"{who!r}: want USER:PASSWORD")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))

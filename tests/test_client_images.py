"""
Images in the reference client: the ThumbHash encoder (cyphr.client.thumbhash)
against values derived from the algorithm; what an image's pointer carries
(upright dimensions, a thumbnail without metadata, a thumbhash) and what goes
as a plain file instead (not an image, damaged, a decompression bomb); and
encrypted avatars, set by one person, taken by a contact only from its owner
and only while the server's profile names it.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client import attachments
from cyphr.client.attachcrypto import AttachmentError, Pointer, new_key
from cyphr.client.client import Client, Message
from cyphr.client.crypto import b64
from cyphr.client.http import ClientError
from cyphr.client.render import line
from cyphr.client.thumbhash import (
    ThumbHashError,
    rgba_to_thumbhash,
    thumbhash_to_approximate_aspect_ratio,
    thumbhash_to_average_rgba,
)
from tests.clients import PASSPHRASE, ServedClients
from tests.helpers import SQLiteMixin, cli_in_process

GPS_IFD = 0x8825
ORIENTATION = 0x0112
# A position in the EXIF's GPS block: degrees, minutes, seconds.
GPS = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}


# -- images made for the tests ---------------------------------------------------------------

def solid(width: int, height: int, rgba: tuple[int, int, int, int]) -> bytes:
    return bytes(rgba) * (width * height)


def disc(width: int, height: int) -> bytes:
    """An orange disc on blue that fades from transparent on the left to
    opaque on the right."""
    out = bytearray()
    for y in range(height):
        for x in range(width):
            inside = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2
            out += bytes((230, 180, 20, 255) if inside
                         else (20, 60, 200, (x * 255) // (width - 1)))
    return bytes(out)


def halves(width: int, height: int, left: tuple[int, ...], right: tuple[int, ...]) -> bytes:
    return b"".join(bytes(left if x < width // 2 else right)
                    for y in range(height) for x in range(width))


def photo(path: Path, size: tuple[int, int] = (1600, 1200), orientation: int | None = None,
          gps: bool = True) -> Path:
    """A JPEG with structure (a gradient and a square) and, with ``gps``,
    an EXIF block holding a GPS position and a camera's name."""
    width, height = size
    # Pixel (x, y) is (x * 255 // width, y * 255 // height, 90), built per
    # band from whole rows (a list of two million tuples cost 0.2 s).
    red = bytes(x * 255 // width for x in range(width)) * height
    green = b"".join(bytes([y * 255 // height]) * width for y in range(height))
    image = Image.merge("RGB", [Image.frombytes("L", size, red), Image.frombytes("L", size, green),
                                Image.new("L", size, 90)])
    image.paste((240, 240, 30), (width // 4, height // 4, width // 2, height // 2))
    exif = Image.Exif()
    if gps:
        exif[0x010F] = "Cyphr Test Camera"  # Make
        exif[GPS_IFD] = GPS
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    with Image.open(path) as written:  # the fixture is what it says
        assert (written.getexif().get_ifd(GPS_IFD) != {}) == gps
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def bomb_bytes(width: int, height: int) -> bytes:
    """The file ``bomb`` writes. Made once per size and test run: deflating
    the 200 MB of a 40,000 x 40,000 one costs half a second, and two tests
    use it (they only read it)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # the filter byte, then the bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels:
    a few KiB that decode to ``width * height`` pixels (4 bytes each in
    RGBA)."""
    path.write_bytes(bomb_bytes(width, height))
    return path


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_no_metadata(case: SynchronousTestCase, data: bytes) -> None:
    """An image file without EXIF (GPS included), XMP, ICC profile or comment."""
    image = decoded(data)
    case.assertEqual(dict(image.getexif()), {})
    case.assertEqual(image.getexif().get_ifd(GPS_IFD), {})
    for key in ("exif", "xmp", "icc_profile", "comment"):
        case.assertNotIn(key, image.info)
    case.assertNotIn(b"Exif\x00", data)
    case.assertNotIn(b"Cyphr Test Camera", data)


# -- ThumbHash --------------------------------------------------------------------------------

class ThumbHashTests(SynchronousTestCase):
    def test_reference_bytes(self) -> None:
        """The encoder gives the bytes the published algorithm gives."""
        # The header of a solid colour, worked out by hand from the
        # algorithm: white is L = 1, P = Q = 0 (l_dc 63, p_dc and q_dc
        # 31.5 rounded up to 32, no AC scale); red is L = 1/3, P = 1/2, Q = 1.
        self.assertEqual(rgba_to_thumbhash(100, 100, solid(100, 100, (255, 255, 255, 255)))[:5],
                         bytes([0x3F, 0x08, 0x02, 0x07, 0x00]))
        self.assertEqual(rgba_to_thumbhash(100, 100, solid(100, 100, (255, 0, 0, 255)))[:5],
                         bytes([0xD5, 0xFB, 0x03, 0x07, 0x00]))
        # A whole hash, with alpha and every term: the one the reference
        # implementations (JavaScript in doubles, Rust in floats) give.
        self.assertEqual(rgba_to_thumbhash(60, 100, disc(60, 100)).hex(),
                         "9be6856306393b870888b73b87b0730850767788748998")

    def test_size(self) -> None:
        """A hash is 13 to 25 bytes: 24 for an opaque square, 25 with alpha, fewer when long."""
        self.assertEqual(len(rgba_to_thumbhash(100, 100, halves(100, 100, (255, 0, 0, 255),
                                                                  (0, 0, 255, 255)))), 24)
        self.assertEqual(len(rgba_to_thumbhash(50, 50, disc(50, 50))), 25)
        self.assertEqual(len(rgba_to_thumbhash(1, 1, bytes([9, 9, 9, 255]))), 24)
        self.assertEqual(len(rgba_to_thumbhash(100, 10, solid(100, 10, (1, 2, 3, 255)))), 17)
        for width, height in ((100, 1), (1, 100), (37, 91), (100, 100), (64, 48)):
            for alpha in (255, 100):
                hashed = rgba_to_thumbhash(width, height, solid(width, height, (10, 200, 30,
                                                                                alpha)))
                self.assertTrue(13 <= len(hashed) <= 25, (width, height, alpha, len(hashed)))

    def test_aspect_ratio_round_trip(self) -> None:
        """The aspect ratio read back from a hash is the image's within a third."""
        for width, height in ((100, 100), (100, 75), (75, 100), (100, 50), (50, 100),
                              (100, 25), (25, 100), (64, 48)):
            for pixels in (halves(width, height, (200, 30, 30, 255), (30, 30, 200, 255)),
                           disc(width, height)):
                ratio = thumbhash_to_approximate_aspect_ratio(
                    rgba_to_thumbhash(width, height, pixels))
                self.assertLess(abs(math.log(ratio / (width / height))), math.log(4 / 3),
                                (width, height, ratio))

    def test_average_colour_round_trip(self) -> None:
        """The average colour read back from a hash is the image's within 5% a channel."""
        for width, height, pixels, average in (
                (100, 100, solid(100, 100, (255, 255, 255, 255)), (1, 1, 1, 1)),
                (40, 70, solid(40, 70, (255, 0, 0, 255)), (1, 0, 0, 1)),
                (90, 30, solid(90, 30, (20, 140, 220, 255)), (20 / 255, 140 / 255, 220 / 255, 1)),
                (80, 80, halves(80, 80, (255, 255, 0, 255), (0, 0, 255, 255)), (0.5, 0.5, 0.5, 1)),
                (60, 60, halves(60, 60, (0, 200, 0, 255), (0, 200, 0, 0)), (0, 200 / 255, 0, 0.5))):
            hashed = rgba_to_thumbhash(width, height, pixels)
            for got, wanted in zip(thumbhash_to_average_rgba(hashed), average):
                self.assertLess(abs(got - wanted), 0.05, (width, height, average))

    def test_refused(self) -> None:
        """An image over 100 pixels a side, of no pixels or the wrong bytes, and a short hash are refused."""
        for width, height, pixels in ((101, 10, solid(101, 10, (0, 0, 0, 255))),
                                      (0, 10, b""), (10, 10, bytes(399))):
            self.assertRaises(ThumbHashError, rgba_to_thumbhash, width, height, pixels)
        for hashed in (b"", b"\x01\x02\x03\x04", b"\x00\x00\x80\x05\x00"):
            self.assertRaises(ThumbHashError, thumbhash_to_average_rgba, hashed)
            self.assertRaises(ThumbHashError, thumbhash_to_approximate_aspect_ratio, hashed)


# -- the pointer ----------------------------------------------------------------------------

def pointer_json(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"id": "att_1", "key": b64(new_key()), "digest": b64(bytes(32)),
                              "size": 5000, "mimeType": "image/jpeg", "fileName": "a.jpg",
                              "width": 30, "height": 20, "thumbnail": b64(b"\xff\xd8 jpeg"),
                              "thumbhash": b64(bytes(range(24)))}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not ...}


class PointerThumbHashTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A pointer's thumbhash reads back; absent, the field is left out."""
        for obj in (pointer_json(), pointer_json(thumbhash=...)):
            self.assertEqual(Pointer.from_json(obj).to_json(), obj)
        self.assertEqual(Pointer.from_json(pointer_json()).thumbhash, bytes(range(24)))

    def test_refused(self) -> None:
        """A thumbhash of under 5 or over 32 bytes, null, or not canonical base64 is refused."""
        for value in (b64(bytes(4)), b64(bytes(33)), None, "", 5, "AAAAAAB=",
                      b64(bytes(7)).rstrip("=")):
            self.assertRaises(AttachmentError, Pointer.from_json, pointer_json(thumbhash=value))
        for size in (5, 32):
            Pointer.from_json(pointer_json(thumbhash=b64(bytes(size))))

    def test_public_json(self) -> None:
        """What is shown of a pointer says hasThumbnail, never the thumbnail or thumbhash."""
        pointer = Pointer.from_json(pointer_json())
        shown = attachments.public_json(pointer)
        self.assertEqual(shown, {"id": "att_1", "size": 5000, "mimeType": "image/jpeg",
                                 "fileName": "a.jpg", "width": 30, "height": 20,
                                 "hasThumbnail": True})
        for secret in (pointer.thumbnail, pointer.thumbhash, pointer.key):
            self.assertNotIn(b64(secret), json.dumps(shown))
        self.assertNotIn("hasThumbnail", attachments.public_json(
            Pointer.from_json(pointer_json(thumbnail=...))))


# -- what an image's pointer carries -------------------------------------------------------------

class ImageFieldsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_photo(self) -> None:
        """A photo gives its upright size, a small thumbnail without EXIF or GPS, and a thumbhash."""
        fields = attachments.image_fields(photo(self.dir / "p.jpg", (1600, 1200), orientation=6))
        self.assertEqual(set(fields), {"width", "height", "thumbnail", "thumbhash"})
        self.assertEqual((fields["width"], fields["height"]), (1200, 1600))  # turned upright
        data = base64.b64decode(fields["thumbnail"])
        self.assertLessEqual(len(data), attachments.THUMBNAIL_TARGET_BYTES)
        thumbnail = decoded(data)
        self.assertEqual((thumbnail.format, thumbnail.size), ("JPEG", (192, 256)))
        assert_no_metadata(self, data)
        hashed = base64.b64decode(fields["thumbhash"])
        self.assertLess(thumbhash_to_approximate_aspect_ratio(hashed), 1)  # portrait
        Pointer.from_json({**pointer_json(), **fields})

    def test_noise_fits(self) -> None:
        """A picture of noise, which compresses badly, still gets a thumbnail under the target."""
        Image.frombytes("RGB", (1200, 900), os.urandom(1200 * 900 * 3)).save(self.dir / "n.png")
        fields = attachments.image_fields(self.dir / "n.png")
        data = base64.b64decode(fields["thumbnail"])
        self.assertLessEqual(len(data), attachments.THUMBNAIL_TARGET_BYTES)
        self.assertLessEqual(max(decoded(data).size), attachments.THUMBNAIL_SIDE)

    def test_transparency(self) -> None:
        """A transparent image's thumbnail is flattened on white; its thumbhash keeps the alpha."""
        Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(self.dir / "t.png")
        fields = attachments.image_fields(self.dir / "t.png")
        self.assertEqual(decoded(base64.b64decode(fields["thumbnail"])).getpixel((5, 5)),
                         (255, 255, 255))
        self.assertEqual(thumbhash_to_average_rgba(base64.b64decode(fields["thumbhash"]))[3], 0)

    def test_not_images(self) -> None:
        """Text, random bytes, a damaged or cut-off image give no image fields, and raise nothing."""
        (self.dir / "a.txt").write_text("hello")
        (self.dir / "r.png").write_bytes(os.urandom(5000))
        good = photo(self.dir / "good.jpg").read_bytes()
        (self.dir / "cut.jpg").write_bytes(good[:len(good) // 2])
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(png, format="PNG")
        damaged = bytearray(png.getvalue())
        damaged[45] ^= 0xFF  # inside IDAT's data: its CRC no longer matches
        (self.dir / "crc.png").write_bytes(bytes(damaged))
        for name in ("a.txt", "r.png", "cut.jpg", "crc.png", "missing.png"):
            self.assertEqual(attachments.image_fields(self.dir / name), {}, name)

    def test_decompression_bombs(self) -> None:
        """An image of too many pixels gives no image fields at once, without being decoded."""
        for width, height in ((40_000, 40_000), (9_000, 8_000)):
            # 1.6 billion pixels (over twice Pillow's limit), and 72 million
            # (over this client's 64 Mi, under Pillow's 89 million).
            path = bomb(self.dir / f"{width}.png", width, height)
            self.assertLess(path.stat().st_size, 300_000)
            started = time.monotonic()
            self.assertEqual(attachments.image_fields(path), {})
            self.assertLess(time.monotonic() - started, 2)

    def test_avatar_image(self) -> None:
        """An avatar is the picture's centre, square, at most 512 pixels, with no metadata."""
        made = attachments.avatar_image(photo(self.dir / "p.jpg", (1600, 1000)))
        square = decoded(made)
        self.assertEqual((square.format, square.size), ("JPEG", (512, 512)))
        assert_no_metadata(self, made)
        # The centre: the yellow square of the photo is in its upper left quarter.
        self.assertGreater(sum(square.getpixel((150, 200))[:2]), 400)
        small = decoded(attachments.avatar_image(photo(self.dir / "s.jpg", (100, 60))))
        self.assertEqual(small.size, (60, 60))
        (self.dir / "a.txt").write_text("hello")
        for name, said in (("a.txt", "is not an image"), ("missing.jpg", "cannot read")):
            with self.assertRaises(ClientError) as raised:
                attachments.avatar_image(self.dir / name)
            self.assertIn(said, str(raised.exception))


# -- against a server ------------------------------------------------------------------------

class ServedImages(ServedClients):
    timeout = 240

    def folder(self) -> Path:
        folder = Path(self.mktemp())
        folder.mkdir()
        return folder

    async def read(self, reader: Client, sent: dict[str, Any]) -> Message:
        """The message ``sent`` as ``reader``'s history shows it."""
        [message] = [m for m in await self.thread(reader.history, sent["chatId"])
                     if m.id == sent["messageId"]]
        return message

    async def system(self, sender: Client, to: str, content: dict[str, Any]) -> dict[str, Any]:
        return await self.thread(sender._send, to, json.dumps(content).encode(), "system")


class ImageMessageTests(SQLiteMixin, ServedImages, TestCase):
    async def test_image_carries_preview(self) -> None:
        """A photo arrives with its dimensions, thumbhash and a thumbnail without EXIF or GPS."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        source = photo(self.folder() / "beach.jpg", (2000, 1500))
        sent = await self.thread(alice.send_file, "bob", source, "the beach")
        message = await self.read(bob, sent)
        pointer = message.attachment
        self.assertEqual((message.message_type, message.text, pointer.width, pointer.height),
                         ("image", "the beach", 2000, 1500))
        self.assertIsNotNone(pointer.thumbhash)
        thumbnail = await self.thread(bob.thumbnail, message)
        self.assertEqual(thumbnail, pointer.thumbnail)
        self.assertEqual(decoded(thumbnail).size, (256, 192))
        assert_no_metadata(self, thumbnail)
        shown = message.as_json()["attachment"]
        self.assertEqual((shown["width"], shown["height"], shown["hasThumbnail"]),
                         (2000, 1500, True))
        self.assertEqual(sent["attachment"], shown)
        for field in ("thumbnail", "thumbhash", "key"):
            self.assertNotIn(field, shown)
        target = self.folder() / "copy.jpg"
        await self.thread(bob.download, message, target)
        self.assertEqual(target.read_bytes(), source.read_bytes())  # the file itself, as sent

    async def test_plain_files(self) -> None:
        """A text, a damaged image and a decompression bomb go as plain files, the bomb at once."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        folder = self.folder()
        (folder / "notes.txt").write_text("just text")
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(3000))
        bomb(folder / "bomb.png", 40_000, 40_000)
        for name, kind in (("notes.txt", "file"), ("broken.png", "image"),
                           ("bomb.png", "image")):
            started = time.monotonic()
            sent = await self.thread(alice.send_file, "bob", folder / name)
            self.assertLess(time.monotonic() - started, 30, name)
            message = await self.read(bob, sent)
            pointer = message.attachment
            self.assertEqual((message.message_type, pointer.file_name), (kind, name))
            self.assertEqual((pointer.width, pointer.height, pointer.thumbnail,
                              pointer.thumbhash), (None,) * 4, name)
            self.assertIsNone(await self.thread(bob.thumbnail, message))
            self.assertNotIn("hasThumbnail", message.as_json()["attachment"])
            target = folder / f"got-{name}"
            await self.thread(bob.download, message, target)
            self.assertEqual(target.read_bytes(), (folder / name).read_bytes())


class AvatarTests(SQLiteMixin, ServedImages, TestCase):
    async def avatar_set(self) -> tuple[Client, Client, dict[str, Any], bytes]:
        """alice and bob in a direct chat; alice sets an avatar, which bob
        reads: (alice, bob, the text's send, the avatar's bytes)."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        hello = await self.thread(alice.send, "bob", "hello")
        source = photo(self.folder() / "me.jpg", (1200, 800))
        answer = await self.thread(alice.set_avatar, source)
        self.assertEqual((answer["sentTo"], answer["notSent"]), (["bob"], {}))
        self.assertEqual((answer["attachment"]["width"], answer["attachment"]["height"]),
                         (512, 512))
        own = await self.thread(alice.avatar, "alice")
        made = own.read_bytes()
        self.assertEqual(made, attachments.avatar_image(source))
        await self.thread(bob.history, hello["chatId"])
        return alice, bob, hello, made

    async def test_contact_gets_the_avatar(self) -> None:
        """A contact receives the avatar in a sealed system message and gets the same image bytes."""
        alice, bob, hello, made = await self.avatar_set()
        user = await self.thread(bob.user, "alice")
        kept = attachments._kept_avatar(bob, "alice")
        self.assertEqual(user["avatarUrl"], kept["id"])
        history = await self.thread(bob.history, hello["chatId"])
        [announced] = [m for m in history if m.message_type == "system"]
        self.assertEqual((announced.error, announced.sender), (None, "alice"))
        path = await self.thread(bob.avatar, "alice")
        self.assertEqual(path.parent, bob.profile.directory / "cache" / "avatars")
        self.assertEqual(path.read_bytes(), made)
        assert_no_metadata(self, path.read_bytes())
        self.assertEqual(await self.thread(bob.avatar, "alice"), path)  # from the cache
        self.assertIsNone(await self.thread(alice.avatar, "bob"))  # bob has none

        # A new avatar replaces the old one, in the cache too.
        other = photo(self.folder() / "new.jpg", (300, 500), gps=False)
        await self.thread(alice.set_avatar, other)
        await self.thread(bob.history, hello["chatId"])
        newer = await self.thread(bob.avatar, "alice")
        self.assertEqual(newer.read_bytes(), attachments.avatar_image(other))
        self.assertEqual(sorted(p.name for p in newer.parent.iterdir()), [newer.name])

    async def test_refused_from_someone_else(self) -> None:
        """An avatar pointer sent by another than its owner is refused and shown as a problem."""
        alice, bob, _, made = await self.avatar_set()
        mallory = await self.registered("mallory")
        stolen = attachments._kept_avatar(bob, "alice")
        sent = await self.system(mallory, "bob", {"avatar": stolen})
        message = await self.read(bob, sent)
        self.assertIsNone(message.text)
        self.assertIn("an avatar refused: this is not mallory's avatar", message.error)
        self.assertIn("✗ (an avatar refused", line(message, "bob"))
        self.assertIsNone(await self.thread(bob.avatar, "mallory"))
        self.assertEqual((await self.thread(bob.avatar, "alice")).read_bytes(), made)
        # Read again (kept with its problem), it shows the same.
        self.assertEqual((await self.read(bob, sent)).error, message.error)

    async def test_refused_when_not_the_avatar(self) -> None:
        """An avatar pointer naming another upload than the owner's avatarUrl is refused."""
        alice, bob, _, made = await self.avatar_set()
        other = await self.thread(alice.upload_file, photo(self.folder() / "x.jpg", (64, 64)))
        sent = await self.system(alice, "bob", {"avatar": other.to_json()})
        message = await self.read(bob, sent)
        self.assertIsNone(message.text)
        self.assertIn("this is not alice's avatar: the server's profile of alice names another",
                      message.error)
        self.assertEqual(attachments._kept_avatar(bob, "alice")["id"],
                         (await self.thread(bob.user, "alice"))["avatarUrl"])
        self.assertEqual((await self.thread(bob.avatar, "alice")).read_bytes(), made)

    async def test_refused_outside_the_direct_chat(self) -> None:
        """The owner's own current avatar pointer sent in a group is refused."""
        alice, bob, _, _ = await self.avatar_set()
        carol = await self.registered("carol")
        await self.thread(alice.send, "carol", "hi")  # a group takes contacts only
        group = await self.thread(alice.create_group, "friends", ["bob", "carol"])
        pointer = attachments._kept_avatar(alice, "alice")
        sent = await self.system(alice, group, {"avatar": pointer})
        for reader in (bob, carol):
            message = await self.read(reader, sent)
            self.assertIsNone(message.text)
            self.assertIn("comes in the direct chat with alice only", message.error)
        self.assertIsNone(await self.thread(carol.avatar, "alice"))

    async def test_command_line(self) -> None:
        """avatar set and avatar get go through cyphr-client, get writing the image with --out."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.send, "bob", "hello")

        async def cli(client: Client, *args: str, status: int = 0) -> Any:
            passphrase = Path(f"{client.profile.directory}.passphrase")
            passphrase.write_text(PASSPHRASE)
            result = await self.thread(cli_in_process, [
                "--server", self.url, "--profile", str(client.profile.directory),
                "--passphrase-file", str(passphrase), *args])
            self.assertEqual(result.returncode, status, result.stderr)
            return result

        folder = self.folder()
        source = photo(folder / "me.jpg")
        said = await cli(alice, "avatar", "set", str(source))
        self.assertIn("Avatar set: 512 x 512 pixels", said.stdout)
        self.assertIn("Its key went to bob.", said.stdout)
        await cli(bob, "history", "alice")
        got = await cli(bob, "--json", "avatar", "get", "alice", "--out", str(folder))
        self.assertEqual(json.loads(got.stdout)["path"], str(folder / "alice.jpg"))
        self.assertEqual((folder / "alice.jpg").read_bytes(), attachments.avatar_image(source))
        none = await cli(alice, "avatar", "get", "bob", status=1)
        self.assertIn("no avatar of bob here", none.stderr)
        missing = await cli(alice, "avatar", "set", str(folder / "nothing.jpg"), status=1)
        self.assertIn("is not a file", missing.stderr)

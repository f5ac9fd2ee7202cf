"""
Files in chats, on the client. A file is encrypted here under a key of its
own (cyphr.client.attachcrypto; docs/encryption.rst, "Attachments"),
uploaded as an opaque blob with TUS 1.0.0, resumably
(cyphr.api.attachments), and named by a *file message*, whose end-to-end
encrypted plaintext carries the pointer::

    message type  "image", "audio" or "video" after the file's MIME type,
                  else "file"
    plaintext     UTF-8 JSON {"attachment": <pointer>, "text": <caption>}
                  ("text" left out when there is no caption)

The send's body also lists the blob's id (``"attachments": [id]``) beside
the sealed payload: that, the blob's padded length and who uploads and
downloads it are all the server learns. It keeps a blob while a message
names it (30 days at most, by default). The pointer, key included, travels
in the sealed plaintext only; :func:`public_json` is what may be shown of
it.

An image that Pillow reads gets its upright dimensions, a thumbnail (a
JPEG of at most 256 pixels a side, no metadata) and a ThumbHash
(cyphr.client.thumbhash) in its pointer: :func:`image_fields`. Anything
else, a damaged image or a decompression bomb among it, goes as a plain
file.

A profile avatar is an attachment too (:func:`set_avatar`): a square JPEG
of at most 512 pixels, uploaded, named by ``avatarUrl`` (which the server
then keeps), and its pointer sent to each contact in a sealed ``system``
message ``{"avatar": <pointer>}``; a contact takes it only from its owner,
in their direct chat, and only while the server's profile names it
(:func:`take_avatar`), and :func:`avatar` downloads it into the profile's
cache.

Functions of a :class:`~cyphr.client.client.Client`, whose thin methods
(``upload_file``, ``send_file``, ``download``, ``forward``,
``find_message``) call them. They block, as the rest of the client, and
use its ``requests`` session: a transfer streams from or to a file, a piece
at a time, and resumes after a dropped connection.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

import requests

from cyphr.client import thumbhash
from cyphr.client.attachcrypto import (
    MAX_DIMENSION,
    MAX_FILE_NAME_BYTES,
    AttachmentError,
    Pointer,
    decrypt_file,
    encrypt_file,
    encrypted_size,
    file_name_problem,
    safe_file_name,
)
from cyphr.client.crypto import CryptoError, b64
from cyphr.client.http import ApiError, ClientError, segment

if TYPE_CHECKING:
    from PIL import Image

    from cyphr.client.client import Client, Message

_log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

FILE_TYPES = frozenset({"file", "image", "audio", "video"})
DEFAULT_MIME_TYPE = "application/octet-stream"
PATH = "/api/attachments/"
PIECE_BYTES = 4 * 1024 * 1024  # one PATCH: what a dropped connection may cost again
READ_BYTES = 256 * 1024  # a download is written a piece of this size at a time
# After a dropped connection, a 5xx or a 409 (the server still finishing
# the append that was cut): wait this long and ask where to resume, at most
# this many times in a row without progress.
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 4.0)
MAX_NUMBERED = 1000  # "name (1).ext" .. "name (999).ext" before giving up
FIND_PAGE = 100
FIND_PAGES = 10  # messages looked through per chat by find_message: 1,000
_TUS = {"Tus-Resumable": "1.0.0"}
_OFFSET_TYPE = "application/offset+octet-stream"
# mimetypes.guess_type's encodings: the file is then of this type.
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
               "xz": "application/x-xz", "br": "application/x-brotli",
               "compress": "application/x-compress"}
_SESSION_CODES = {"INVALID_TOKEN", "TOKEN_EXPIRED", "TOKEN_REVOKED", "UNAUTHORIZED"}
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")
# Images. A file of more pixels than this is not decoded (a decompression
# bomb: a few KiB that decode to gigabytes) and goes as a plain file; it is
# 64 megapixels, a large phone camera's photo. Pillow's own limit
# (Image.MAX_IMAGE_PIXELS) applies too, when lower.
IMAGE_MAX_PIXELS = 64 * 1024 * 1024
# The formats decoded (those of photos and pictures in chats; HEIF and AVIF
# where the installed Pillow reads them): no other of Pillow's decoders is
# given a file someone chose.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "AVIF", "HEIF")
THUMBNAIL_SIDE = 256  # the thumbnail's long side at most, in pixels
THUMBNAIL_TARGET_BYTES = 24 * 1024  # well under the pointer's 32 KiB
THUMBNAIL_QUALITIES = (75, 60, 45, 30)  # JPEG qualities tried, best first
THUMBNAIL_MIN_SIDE = 64  # smaller than this, no thumbnail at all
AVATAR_SIDE = 512  # an avatar is a square of at most this many pixels a side
AVATAR_QUALITY = 85
AVATAR_FILE_NAME = "avatar.jpg"
AVATAR = "avatar"  # a system message's field: the pointer to its sender's avatar
MAX_AVATAR_BYTES = 5 * 1024 * 1024  # an avatar's pointer naming a larger file is refused
AVATAR_CACHE = ("cache", "avatars")  # under the profile's directory
_WHITE = (255, 255, 255)  # what a transparent image is flattened on, in a JPEG


class _Again(Exception):
    """A transfer failed in a way worth resuming from the server's offset."""


# -- the file message ---------------------------------------------------------------

def public_json(pointer: Pointer) -> dict[str, Any]:
    """What may be shown of a pointer (``--json`` output, logs): its id,
    size, type, name and dimensions, and ``hasThumbnail`` when it carries
    one; never its key, digest, thumbnail or thumbhash (previews of the
    picture: Client.thumbnail gives the thumbnail)."""
    shown: dict[str, Any] = {"id": pointer.id, "size": pointer.size,
                             "mimeType": pointer.mime_type, "fileName": pointer.file_name}
    if pointer.width is not None:
        shown["width"], shown["height"] = pointer.width, pointer.height
    if pointer.thumbnail is not None:
        shown["hasThumbnail"] = True
    return shown


def file_message(pointer: Pointer, caption: str | None = None) -> bytes:
    """The plaintext of a file message."""
    content: dict[str, Any] = {"attachment": pointer.to_json()}
    if caption:
        content["text"] = caption
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_file_message(text: str) -> tuple[Pointer, str]:
    """The pointer and caption ("" when none) of a file message's
    plaintext; AttachmentError saying what is wrong. Fields other than
    "attachment" and "text" are left for later versions."""
    try:
        content = json.loads(text)
    except ValueError:
        raise AttachmentError("the message is not a file message's JSON") from None
    if not isinstance(content, dict) or "attachment" not in content:
        raise AttachmentError("the message carries no attachment")
    caption = content.get("text", "")
    if not isinstance(caption, str):
        raise AttachmentError("its caption is not text")
    return Pointer.from_json(content["attachment"]), caption


def message_type_for(mime_type: str) -> str:
    """The message type of a file of ``mime_type``: image, audio, video, else file."""
    major = mime_type.split("/", 1)[0].lower()
    return major if major in ("image", "audio", "video") else "file"


def _mime_type_allowed(mime_type: str) -> bool:
    try:
        Pointer("x", bytes(32), bytes(32), 0, mime_type, "x")
    except AttachmentError:
        return False
    return True


def guess_mime_type(path: str | os.PathLike[str]) -> str:
    """The MIME type the file's name suggests (a compressed file's is the
    compression's); application/octet-stream when it suggests none."""
    mime_type, encoding = mimetypes.guess_type(os.fspath(path), strict=False)
    if encoding is not None:
        mime_type = _COMPRESSED.get(encoding)
    if not mime_type or not _mime_type_allowed(mime_type):
        return DEFAULT_MIME_TYPE
    return mime_type


# -- images ----------------------------------------------------------------------------

class _NotAnImage(Exception):
    """A file that is not decoded as an image (the text says why)."""


def _decoded(path: str | os.PathLike[str], side: int) -> tuple[Image.Image, int, int]:
    """The image at ``path`` decoded and turned upright (its EXIF
    orientation applied), at least ``side`` pixels a side where the file
    holds that many (a JPEG decodes at 1/2 to 1/8 of its size when that
    is enough); and its full width and height, upright. Checked first:
    its header (the pixel count, before anything is decoded) and, where
    the format allows, its integrity (Image.verify). Pillow's errors pass
    through."""
    from PIL import Image, ImageOps

    limit = IMAGE_MAX_PIXELS
    if Image.MAX_IMAGE_PIXELS:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    Image.init()
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]
    # Image.open reads the header only (and refuses a size over twice
    # Pillow's limit: DecompressionBombError).
    with Image.open(path, formats=formats) as probe:
        width, height = probe.size
        if width * height > limit:
            raise _NotAnImage(f"{width} x {height} pixels, over the {limit} decoded at most")
        probe.verify()
    # verify() leaves an image unusable: open it again to decode it.
    with Image.open(path, formats=formats) as image:
        if image.size != (width, height):
            raise _NotAnImage("the file changed while it was read")
        image.draft(None, (side, side))
        image.load()
        try:
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
            upright = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
            orientation, upright = 1, image.copy()
    if orientation in (5, 6, 7, 8):  # turned a quarter: the sides trade places
        width, height = height, width
    if not all(1 <= n <= MAX_DIMENSION for n in (width, height)):
        raise _NotAnImage(f"{width} x {height} pixels")
    return upright, width, height


def _flat_rgb(image: Image.Image) -> Image.Image:
    """``image`` as a new RGB image of its pixels only: transparency
    flattened on white, and nothing of the file's metadata (EXIF, GPS,
    XMP, ICC profile, comments), which a new image made from bytes has no
    way to carry."""
    from PIL import Image

    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, _WHITE)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return Image.frombytes("RGB", flat.size, flat.tobytes())


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    _flat_rgb(image).save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


def _thumbnail(image: Image.Image) -> bytes | None:
    """A JPEG of ``image`` of at most THUMBNAIL_SIDE pixels a side, under
    THUMBNAIL_TARGET_BYTES: the best quality that fits, and half the size
    when none does (a noisy picture); None when even THUMBNAIL_MIN_SIDE
    does not fit."""
    from PIL import Image

    side = THUMBNAIL_SIDE
    while side >= THUMBNAIL_MIN_SIDE:
        small = image.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        for quality in THUMBNAIL_QUALITIES:
            data = _jpeg(small, quality)
            if len(data) <= THUMBNAIL_TARGET_BYTES:
                return data
        side //= 2
    return None


def _thumbhash(image: Image.Image) -> bytes:
    """The ThumbHash of ``image``, scaled to fit 100 x 100 first."""
    from PIL import Image

    small = image.convert("RGBA")
    small.thumbnail((thumbhash.MAX_SIDE, thumbhash.MAX_SIDE), Image.Resampling.BOX)
    return thumbhash.rgba_to_thumbhash(small.width, small.height, small.tobytes())


def image_fields(path: str | os.PathLike[str], *, thumbnail: bool = True) -> dict[str, Any]:
    """For an image that Pillow reads, the pointer's fields it gives, as
    in the pointer's JSON: ``width`` and ``height`` upright, ``thumbnail``
    (unless not asked for) and ``thumbhash``. For anything else (not an
    image, damaged, too many pixels, a format Pillow lacks): nothing, and
    the file goes as a plain one; never an exception for what a file
    holds."""
    try:
        image, width, height = _decoded(path, THUMBNAIL_SIDE)
        fields: dict[str, Any] = {"width": width, "height": height,
                                  "thumbhash": b64(_thumbhash(image))}
        if thumbnail:
            small = _thumbnail(image)
            if small is not None:
                fields["thumbnail"] = b64(small)
    except Exception as e:  # noqa: BLE001 - Pillow's many errors, and a bomb's: a plain file
        _log.info("%s goes as a plain file: no image read in it (%s: %s)",
                  os.fspath(path), type(e).__name__, e)
        return {}
    return fields


def avatar_image(path: str | os.PathLike[str]) -> bytes:
    """The avatar made of the image at ``path``: its centre, square, at
    most AVATAR_SIDE pixels a side, as a JPEG without metadata.
    ClientError for a file that is not an image Pillow reads."""
    from PIL import Image, ImageOps

    try:
        image, _, _ = _decoded(path, AVATAR_SIDE)
        side = min(AVATAR_SIDE, image.width, image.height)
        square = ImageOps.fit(image.convert("RGBA"), (side, side), Image.Resampling.LANCZOS)
        return _jpeg(square, AVATAR_QUALITY)
    except OSError as e:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            raise ClientError(f"cannot read {os.fspath(path)}: {e.strerror}") from None
        problem = str(e)
    except Exception as e:  # noqa: BLE001 - Pillow's many errors, as in image_fields
        problem = str(e) or type(e).__name__
    raise ClientError(f"{os.fspath(path)} is not an image this client reads ({problem})")


# -- requests to /api/attachments/ ------------------------------------------------------

def _renew_session(client: Client, why: str) -> None:
    """After a 401: the session another process on the profile signed in
    with since, else an automatic sign-in (as Client._call does, within
    its limit)."""
    with client.profile.lock:
        saved = client.profile.vault.get("token")
    if saved is not None and saved != client.http.token:
        client.http.token = saved
    else:
        client._automatic_login(why)


def _session_ended(response: requests.Response) -> bool:
    if response.status_code != 401:
        return False
    if response.request.method == "HEAD":
        return True  # no body to say why: a 401 of this API is about the session
    try:
        answer = response.json()
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("code") in _SESSION_CODES


def _request(client: Client, method: str, path: str, *, headers: dict[str, str] | None = None,
             renew: bool = True, **kwargs: Any) -> requests.Response:
    """One request with the session's token; with ``renew``, a session
    the server ended is renewed and the request made again (not for a
    body that cannot be read again). requests' exceptions pass through;
    the caller closes the response."""
    if client.http.token is None:
        client._automatic_login("no session")
    for attempt in range(3):
        response = client.http.session.request(
            method, client.http.server + path, timeout=client.http.timeout,
            headers={**(headers or {}), "Authorization": f"Bearer {client.http.token}"},
            **kwargs)
        if not renew or attempt == 2 or not _session_ended(response):
            return response
        response.close()
        _renew_session(client, "the server answered 401")
    raise AssertionError("unreachable")


def _refused(client: Client, response: requests.Response, what: str) -> ClientError:
    """The error a refusal of the server's is: its ApiError when it says
    one, else a ClientError naming ``what`` was asked."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("code"), str):
        retry = response.headers.get("Retry-After")
        return ApiError(response.status_code, answer["code"], str(answer.get("error", "")),
                        answer.get("details"), float(retry) if retry and retry.isdigit() else None)
    return ClientError(f"{client.http.server} answered {response.status_code} to {what}")


def _next_try(failures: int, why: str, what: str) -> int:
    """One more failure in a row of a transfer: wait, and answer the
    count; ClientError once there were too many."""
    if failures >= len(RETRY_DELAYS):
        raise ClientError(f"the {what} failed {failures + 1} times in a row ({why}): given up")
    _log.info("The %s failed (%s): resuming in %.1f s", what, why, RETRY_DELAYS[failures])
    time.sleep(RETRY_DELAYS[failures])
    return failures + 1


def _delete_quietly(client: Client, attachment_id: str) -> None:
    """Delete an upload nothing names (best effort: the server's expiry
    removes it anyway)."""
    try:
        _request(client, "DELETE", PATH + segment(attachment_id), headers=_TUS).close()
    except (requests.RequestException, ClientError) as e:
        _log.info("An unused upload was left for the server to expire: %s", e)


# -- uploading --------------------------------------------------------------------------

class _Piece:
    """``length`` bytes of ``blob`` from ``offset``, as a PATCH's body:
    requests sends a file-like object with a length as it reads it, with
    a Content-Length, never holding it whole."""

    def __init__(self, blob: BinaryIO, offset: int, length: int,
                 sent: Callable[[int], None]) -> None:
        blob.seek(offset)
        self._blob = blob
        self._length = length
        self._left = length
        self._sent = sent

    def __len__(self) -> int:
        return self._length

    def read(self, size: int | None = -1) -> bytes:
        if self._left <= 0:
            return b""
        data = self._blob.read(self._left if size is None or size < 0 else min(size, self._left))
        self._left -= len(data)
        self._sent(self._length - self._left)
        return data


def _create(client: Client, length: int) -> str:
    """A new upload of ``length`` bytes (TUS creation); answers its id."""
    response = _request(client, "POST", PATH, headers={**_TUS, "Upload-Length": str(length)})
    with response:
        if response.status_code != 201:
            raise _refused(client, response, "a new upload")
        try:
            answer = response.json()
        except ValueError:
            answer = None
    attachment_id = answer.get("id") if isinstance(answer, dict) else None
    if not isinstance(attachment_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}",
                                                              attachment_id):
        raise ClientError(f"{client.http.server} answered a new upload without an id")
    return attachment_id


def _server_offset(client: Client, path: str, length: int) -> int:
    """Where the server has the upload (TUS HEAD)."""
    with _request(client, "HEAD", path, headers=_TUS) as response:
        if response.status_code >= 500:
            raise _Again(f"the server answered {response.status_code}")
        if response.status_code == 404:
            raise ClientError("the upload is no longer on the server (it expired, or was "
                              "deleted): send the file again")
        value = response.headers.get("Upload-Offset", "")
        if response.status_code != 200 or not value.isdigit() or int(value) > length:
            raise ClientError(f"{client.http.server} answered {response.status_code} without "
                              f"the upload's offset")
        return int(value)


def _upload_blob(client: Client, attachment_id: str, blob: BinaryIO, length: int,
                 progress: Progress | None) -> None:
    """PATCH the blob in pieces; after a dropped connection, a 5xx, a 409
    or a 401, ask the server where it has the upload and go on from there."""
    path = PATH + segment(attachment_id)
    offset: int | None = 0
    failures = 0
    while True:
        if offset is None:
            try:
                offset = _server_offset(client, path, length)
            except (requests.RequestException, _Again) as e:
                failures = _next_try(failures, str(e) or type(e).__name__, "upload")
                continue
        if progress is not None:
            progress(offset, length)
        if offset == length:
            return
        start = offset
        piece = _Piece(blob, start, min(PIECE_BYTES, length - start),
                       (lambda sent: progress(start + sent, length)) if progress else
                       (lambda sent: None))
        try:
            response = _request(client, "PATCH", path, renew=False, data=piece, headers={
                **_TUS, "Upload-Offset": str(start), "Content-Type": _OFFSET_TYPE})
        except requests.RequestException as e:
            failures = _next_try(failures, type(e).__name__, "upload")
            offset = None
            continue
        with response:
            status, value = response.status_code, response.headers.get("Upload-Offset", "")
            if status == 204 and value.isdigit() and start < int(value) <= length:
                offset, failures = int(value), 0
                continue
            if status in (401, 409) or status >= 500 or status == 204:
                failures = _next_try(failures, f"the server answered {status}", "upload")
                offset = None
                continue
            raise _refused(client, response, "a piece of the upload")


def _checked_name(name: str) -> str:
    """A file name as a pointer may carry it: this one, else made so."""
    return name if file_name_problem(name) is None else safe_file_name(name)


def upload_file(client: Client, path: str | os.PathLike[str], *,
                progress: Progress | None = None) -> Pointer:
    """Encrypt the file at ``path`` under a new key into a temporary file
    (mode 0600, in the profile's directory; removed after), create the
    upload with its exact length and send it in pieces of PIECE_BYTES,
    resuming after a dropped connection; ``progress(sent, total)`` as it
    goes, in the blob's bytes. Answers the pointer: the MIME type guessed
    from the name, the name the path's last component, and for an image
    that Pillow reads its dimensions, thumbnail and thumbhash
    (:func:`image_fields`)."""
    source = Path(path).expanduser()
    mime_type = guess_mime_type(source)
    extra = image_fields(source) if mime_type.startswith("image/") else {}
    return _upload(client, source, _checked_name(source.name), mime_type, extra, progress)


def _upload(client: Client, source: Path, file_name: str, mime_type: str,
            extra: dict[str, Any], progress: Progress | None) -> Pointer:
    try:
        size = source.stat().st_size
        if not source.is_file():
            raise ClientError(f"{source} is not a file")
        with open(source, "rb"):
            pass  # readable: found now, before anything is asked of the server
    except OSError as e:
        raise ClientError(f"cannot read {source}: {e.strerror}") from None
    # A live session, and the server's limit before anything is encrypted.
    limit = client._call("GET", "/api/attachments/config").get("maxSize")
    if isinstance(limit, int) and encrypted_size(size) > limit:
        raise ClientError(f"{source.name} is too large for {client.http.server}: {size} bytes, "
                          f"{encrypted_size(size)} encrypted, over its limit of {limit}")
    fd, blob_path = tempfile.mkstemp(dir=client.profile.directory, prefix=".upload-",
                                     suffix=".part")
    os.close(fd)
    try:
        try:
            fields = encrypt_file(source, blob_path)
        except OSError as e:
            raise ClientError(f"cannot encrypt {source}: {e.strerror}") from None
        length = encrypted_size(fields["size"])  # the size read, should it have changed
        attachment_id = _create(client, length)
        try:
            with open(blob_path, "rb") as blob:
                _upload_blob(client, attachment_id, blob, length, progress)
        except BaseException:
            _delete_quietly(client, attachment_id)  # of no use without this blob's key
            raise
    finally:
        Path(blob_path).unlink(missing_ok=True)
    return Pointer.from_json({"id": attachment_id, **fields, "mimeType": mime_type,
                              "fileName": file_name, **extra})


def send_pointer(client: Client, to: str, pointer: Pointer, caption: str | None = None,
                 message_type: str | None = None) -> dict[str, Any]:
    """Send a file message for ``pointer`` (an upload of this identity's)
    to ``to``, sealed as any message (over sessions or as version 3, again
    after DEVICES_CHANGED); its body names the attachment."""
    if message_type not in FILE_TYPES:
        message_type = message_type_for(pointer.mime_type)

    def transmit(body: dict[str, Any]) -> dict[str, Any]:
        return client._call("POST", "/api/messaging/send", {**body, "attachments": [pointer.id]})

    return client.send_sealed(to, file_message(pointer, caption), message_type, transmit)


def send_file(client: Client, to: str, path: str | os.PathLike[str],
              caption: str | None = None, *, progress: Progress | None = None
              ) -> dict[str, Any]:
    """Upload the file at ``path``, then send it to ``to`` with
    ``caption``; answers as Client.send, and ``attachment``, what
    :func:`public_json` shows of the pointer. A send the server refused
    deletes the upload (nothing names it); one whose answer was lost keeps
    it (the message may be stored)."""
    pointer = upload_file(client, path, progress=progress)
    try:
        answer = send_pointer(client, to, pointer, caption)
    except ApiError:
        _delete_quietly(client, pointer.id)
        raise
    return {**answer, "attachment": public_json(pointer)}


# -- downloading --------------------------------------------------------------------------

def _pointer_of(source: Message | Pointer) -> Pointer:
    if isinstance(source, Pointer):
        return source
    pointer = getattr(source, "attachment", None)
    if pointer is None:
        error = getattr(source, "error", None)
        raise ClientError("this message carries no file" + (f" ({error})" if error else ""))
    return pointer


def _body(response: requests.Response) -> Iterator[bytes]:
    return response.iter_content(READ_BYTES)


def _content_range(response: requests.Response) -> tuple[int, int] | None:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return (int(match.group(1)), int(match.group(3))) if match else None


def _blob_length(client: Client, path: str) -> int:
    """The length of a finished blob, as the server says (HEAD)."""
    with _request(client, "HEAD", path) as response:
        if response.status_code == 404:
            raise ClientError("the file is no longer on the server (it is kept for a limited "
                              "time, and its sender may have deleted it)")
        if response.status_code >= 500:
            raise _Again(f"the server answered {response.status_code}")
        value = response.headers.get("Content-Length", "")
        if response.status_code != 200 or not value.isdigit():
            raise ClientError(f"{client.http.server} answered {response.status_code} without "
                              f"the file's length")
        return int(value)


def _fetch(client: Client, pointer: Pointer, blob: BinaryIO, progress: Progress | None) -> None:
    """Stream the blob into ``blob``; after a dropped connection, ask for
    the rest (``Range``, ``If-Range`` its ETag). A blob of another length
    than the pointer's size gives is refused before any of it is asked
    for."""
    path = PATH + segment(pointer.id)
    expected = encrypted_size(pointer.size)
    received, failures, etag, checked = 0, 0, None, False
    while True:
        if not checked:
            try:
                total = _blob_length(client, path)
            except (requests.RequestException, _Again) as e:
                failures = _next_try(failures, str(e) or type(e).__name__, "download")
                continue
            if total != expected:
                raise AttachmentError(f"the server's blob is {total} bytes; the pointer's file "
                                      f"of {pointer.size} bytes encrypts to {expected}")
            checked = True
        if progress is not None:
            progress(received, expected)
        if received == expected:
            return
        headers = {"Range": f"bytes={received}-", **({"If-Range": etag} if etag else {})} \
            if received else {}
        try:
            response = _request(client, "GET", path, headers=headers, stream=True)
        except requests.RequestException as e:
            failures = _next_try(failures, type(e).__name__, "download")
            continue
        with response:
            status = response.status_code
            if status == 404:
                raise ClientError("the file is no longer on the server (it is kept for a "
                                  "limited time, and its sender may have deleted it)")
            if status >= 500:
                failures = _next_try(failures, f"the server answered {status}", "download")
                continue
            if status == 206 and received:
                span = _content_range(response)
                if span is None or span[0] != received:
                    raise ClientError(f"{client.http.server} answered another range than "
                                      f"the one asked for")
                start, total = span
            elif status == 200:
                start, announced = 0, response.headers.get("Content-Length", "")
                total = int(announced) if announced.isdigit() else expected
            else:
                raise _refused(client, response, "a download")
            if total != expected:
                raise AttachmentError(f"the server's blob is {total} bytes; the pointer's file "
                                      f"of {pointer.size} bytes encrypts to {expected}")
            etag = response.headers.get("ETag") or etag
            blob.seek(start)
            blob.truncate()
            received = start
            try:
                for chunk in _body(response):
                    if received + len(chunk) > expected:
                        raise AttachmentError(f"the server's blob goes on past the {expected} "
                                              f"bytes of the pointer's")
                    blob.write(chunk)
                    received += len(chunk)
                    failures = 0
                    if progress is not None:
                        progress(received, expected)
            except requests.RequestException as e:
                failures = _next_try(failures, type(e).__name__, "download")
                continue
            if received < expected:  # the body ended early, without an error
                failures = _next_try(failures, "the answer ended early", "download")


def _numbered(name: str, n: int) -> str:
    """``name`` with " (n)" before its extension, cut to stay a name."""
    if n == 0:
        return name
    stem, dot, extension = name.rpartition(".")
    if not stem or not dot or len(extension.encode("utf-8")) > 16:
        stem, dot, extension = name, "", ""
    mark = f" ({n})"
    room = MAX_FILE_NAME_BYTES - len((mark + dot + extension).encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{stem}{mark}{dot}{extension}"


def _place(part: Path, directory: Path, name: str) -> Path:
    """Give the file ``part`` a new name in ``directory``: ``name``, else
    "name (1)", "name (2)"...; never one a file already has (a hard link
    fails if the name is taken; where a file system has none, the name is
    taken first with O_EXCL)."""
    for n in range(MAX_NUMBERED):
        candidate = directory / _numbered(name, n)
        try:
            os.link(part, candidate)
        except FileExistsError:
            continue
        except OSError:
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            os.close(fd)
            os.replace(part, candidate)
        return candidate
    raise ClientError(f"{directory} already holds {name} and {MAX_NUMBERED - 1} more of that "
                      f"name")


def download(client: Client, source: Message | Pointer, dest: str | os.PathLike[str], *,
             progress: Progress | None = None) -> Path:
    """Download a file message's (or a pointer's) attachment into a
    temporary file next to ``dest``, resuming after a dropped connection,
    then decrypt it, checking every chunk, the size and the digest. A
    directory ``dest`` gets a new file named after the pointer, made safe
    (attachcrypto.safe_file_name), never replacing one there; any other
    ``dest`` is the file to write (replaced if it exists). A refused blob
    (AttachmentError) leaves nothing behind. Answers the path written."""
    pointer = _pointer_of(source)
    target = Path(dest).expanduser()
    into_directory = target.is_dir()
    directory = target if into_directory else target.parent
    if not directory.is_dir():
        raise ClientError(f"{directory} is not a directory")
    fd, blob_path = tempfile.mkstemp(dir=directory, prefix=".", suffix=".download")
    try:
        with os.fdopen(fd, "w+b") as blob:
            _fetch(client, pointer, blob, progress)
        if not into_directory:
            decrypt_file(blob_path, target, pointer.key, pointer.digest, pointer.size)
            return target
        part_fd, part = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
        os.close(part_fd)
        try:
            decrypt_file(blob_path, part, pointer.key, pointer.digest, pointer.size)
            return _place(Path(part), directory, safe_file_name(pointer.file_name))
        finally:
            Path(part).unlink(missing_ok=True)
    finally:
        Path(blob_path).unlink(missing_ok=True)


# -- forwarding ---------------------------------------------------------------------------

def _uploaded_by_me(client: Client, pointer: Pointer) -> bool:
    """Whether the server serves the pointer's blob as a finished upload
    of this identity's (its uploader's HEAD carries Upload-Offset), which
    a new message of ours may name again. Any device of the identity
    counts: the server knows uploads by account."""
    with _request(client, "HEAD", PATH + segment(pointer.id), headers=_TUS) as response:
        if response.status_code == 404:
            raise ClientError("the file is no longer on the server (it is kept for a limited "
                              "time, and its sender may have deleted it)")
        if response.status_code != 200:
            raise _refused(client, response, "a question about an attachment")
        offset = response.headers.get("Upload-Offset")
        return offset is not None and offset == response.headers.get("Upload-Length") \
            == str(encrypted_size(pointer.size))


def forward(client: Client, to: str, message: Message | Pointer, *,
            progress: Progress | None = None) -> dict[str, Any]:
    """Send a file message's attachment, with its caption, on to ``to``.

    The server lets a message name only its sender's uploads. When this
    identity uploaded the blob (the server says so), the same pointer goes
    again: no transfer, and the new readers get the same key to the same
    blob. Otherwise the file is downloaded (checked), encrypted under a
    new key and uploaded again as this identity's, keeping its name, type,
    dimensions, thumbnail and thumbhash."""
    pointer = _pointer_of(message)
    caption = None if isinstance(message, Pointer) else (message.text or None)
    kind = None if isinstance(message, Pointer) else message.message_type
    if not _uploaded_by_me(client, pointer):
        pointer = _upload_again(client, pointer, progress)
    return send_pointer(client, to, pointer, caption, kind)


def _upload_again(client: Client, pointer: Pointer, progress: Progress | None) -> Pointer:
    work = Path(tempfile.mkdtemp(dir=client.profile.directory, prefix=".forward-"))
    try:
        plain = download(client, pointer, work / "file", progress=progress)
        extra: dict[str, Any] = {}
        if pointer.width is not None:
            extra.update(width=pointer.width, height=pointer.height)
        uploaded = _upload(client, plain, pointer.file_name, pointer.mime_type, extra, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kept = {name: value for name, value in pointer.to_json().items()
            if name in ("thumbnail", "thumbhash")}
    if kept:
        uploaded = Pointer.from_json({**uploaded.to_json(), **kept})
    return uploaded


def thumbnail(source: Message | Pointer) -> bytes | None:
    """The thumbnail a file message's (or a pointer's) pointer carries,
    an image file (the reference client's are JPEGs), or None. It came
    inside the sealed message: nothing is downloaded."""
    return _pointer_of(source).thumbnail


# -- avatars -----------------------------------------------------------------------------

def _kept_avatar(client: Client, cyphr_id: str) -> dict[str, Any] | None:
    with client.profile.lock:
        return client.profile.vault.get("avatars", {}).get(cyphr_id)


def _keep_avatar(client: Client, cyphr_id: str, pointer: Pointer) -> None:
    """Keep ``pointer`` as ``cyphr_id``'s avatar, in the vault (it holds a key)."""
    with client.profile.lock:
        client.profile.vault.setdefault("avatars", {})[cyphr_id] = pointer.to_json()
        client.profile.save()


def _cache_path(client: Client, cyphr_id: str, pointer: Pointer) -> Path:
    """Where ``cyphr_id``'s avatar of ``pointer`` is kept, decrypted: named
    by a digest of the Cyphr ID (so that one person's older avatars can be
    found and removed) and the attachment's id."""
    extension = mimetypes.guess_extension(pointer.mime_type, strict=False) or ""
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", extension):
        extension = ""
    return client.profile.directory.joinpath(*AVATAR_CACHE) / \
        f"{_cache_prefix(cyphr_id)}-{pointer.id}{extension}"


def _cache_prefix(cyphr_id: str) -> str:
    return hashlib.sha256(cyphr_id.encode("utf-8")).hexdigest()[:16]


def _cache_directory(client: Client) -> Path:
    directory = client.profile.directory.joinpath(*AVATAR_CACHE)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def _direct_contacts(client: Client) -> list[str]:
    """Those this identity has a direct chat with."""
    me = client.cyphr_id
    return sorted({p for chat in client.chats() if chat.get("chatType") == "direct"
                   for p in chat.get("participants", []) if p != me})


def set_avatar(client: Client, path: str | os.PathLike[str], *,
               to: list[str] | None = None) -> dict[str, Any]:
    """Make the image at ``path`` this identity's avatar: its centre,
    square, at most AVATAR_SIDE pixels, a JPEG without metadata
    (:func:`avatar_image`), encrypted and uploaded as any attachment;
    ``avatarUrl`` then names it (the server keeps it while it does), and
    its pointer goes in a sealed system message to ``to``, by default
    everyone this identity has a direct chat with (not to every pinned
    key: a message to someone new would open a chat with them). Answers
    ``attachment`` (:func:`public_json`), ``sentTo`` and ``notSent`` (a
    Cyphr ID: why)."""
    source = Path(path).expanduser()
    data = avatar_image(source)
    work = Path(tempfile.mkdtemp(dir=client.profile.directory, prefix=".avatar-"))
    try:
        square = work / AVATAR_FILE_NAME
        square.write_bytes(data)
        # No thumbnail: the avatar is small itself; dimensions and thumbhash.
        pointer = _upload(client, square, AVATAR_FILE_NAME, "image/jpeg",
                          image_fields(square, thumbnail=False), None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        client._call("POST", "/api/cyphr-id/update-profile", {"avatarUrl": pointer.id})
    except ApiError:
        _delete_quietly(client, pointer.id)
        raise
    me = client.cyphr_id
    _keep_avatar(client, me, pointer)
    cached = _cache_path(client, me, pointer)
    fd, part = tempfile.mkstemp(dir=_cache_directory(client), prefix=".", suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(part, cached)
    _forget_cached(cached)
    content = json.dumps({AVATAR: pointer.to_json()}, separators=(",", ":")).encode("utf-8")
    sent: list[str] = []
    not_sent: dict[str, str] = {}
    for cyphr_id in _direct_contacts(client) if to is None else to:
        try:
            client._send(cyphr_id, content, "system")
        except (ClientError, CryptoError) as e:
            _log.warning("The new avatar was not sent to %s: %s", cyphr_id, e)
            not_sent[cyphr_id] = str(e)
        else:
            sent.append(cyphr_id)
    return {"attachment": public_json(pointer), "sentTo": sent, "notSent": not_sent}


def take_avatar(client: Client, chat_id: str, sender: Any, value: Any) -> None:
    """Take the avatar pointer ``value`` that a system message of
    ``sender``'s in ``chat_id`` carries, as ``sender``'s avatar, or refuse
    it (ClientError or AttachmentError saying why): it must be a pointer
    to an image of at most MAX_AVATAR_BYTES, come in the direct chat of
    this identity and ``sender``, and name the attachment that the
    server's profile of ``sender`` names as ``avatarUrl`` now (the
    server's word alone cannot make a pointer: it can only say which one
    of those its owner sent is current). One's own, from another device,
    is taken when current and otherwise left, never refused."""
    pointer = Pointer.from_json(value)
    if not pointer.mime_type.startswith("image/"):
        raise AttachmentError(f"an avatar is an image, not {pointer.mime_type}")
    if pointer.size > MAX_AVATAR_BYTES:
        raise AttachmentError(f"an avatar is at most {MAX_AVATAR_BYTES} bytes, not "
                              f"{pointer.size}")
    me = client.cyphr_id
    if not isinstance(sender, str) or not sender:
        raise ClientError("an avatar comes from its owner: this message names no sender")
    chat = client._chat(chat_id)
    participants = set(chat.get("participants", [])) if chat is not None else set()
    if chat is None or chat.get("chatType") != "direct" or me not in participants \
            or (sender != me and participants != {me, sender}):
        raise ClientError(f"{sender}'s avatar comes in the direct chat with {sender} only")
    if _kept_avatar(client, sender) == pointer.to_json():
        return  # taken before (a message opened again)
    current = client.user(sender).get("avatarUrl")
    if current != pointer.id:
        if sender == me:
            return  # one's own, since replaced
        raise ClientError(f"this is not {sender}'s avatar: the server's profile of {sender} "
                          f"names {'another' if current else 'none'} (an older one of theirs, "
                          f"or one that never was)")
    _keep_avatar(client, sender, pointer)


def _forget_cached(keep: Path) -> None:
    """Remove the cached avatars of the same person as ``keep``, but it."""
    prefix = keep.name.split("-", 1)[0] + "-"
    for old in keep.parent.glob(prefix + "*"):
        if old != keep and old.is_file():
            old.unlink(missing_ok=True)


def avatar(client: Client, cyphr_id: str, *, progress: Progress | None = None) -> Path | None:
    """``cyphr_id``'s avatar, decrypted, in the profile's cache directory
    (downloaded the first time, checked as any attachment): the one whose
    pointer came from them (:func:`take_avatar`), while the server's
    profile still names it. None when none came, or the profile names
    another since (removed, or a new one whose pointer has not come)."""
    kept = _kept_avatar(client, cyphr_id)
    if kept is None:
        return None
    pointer = Pointer.from_json(kept)
    if client.user(cyphr_id).get("avatarUrl") != pointer.id:
        return None
    path = _cache_path(client, cyphr_id, pointer)
    if not path.is_file():
        _cache_directory(client)
        download(client, pointer, path, progress=progress)
        _forget_cached(path)
    return path


# -- finding a message ----------------------------------------------------------------------

def find_message(client: Client, message_id: str) -> Message | None:
    """A message by its id: from the local store (what this device read or
    sent), else from the latest FIND_PAGES * FIND_PAGE messages of each
    chat; None when neither has it."""
    kept = client.store.message(message_id)
    if kept is not None:
        return client.open_message({
            "id": message_id, "chatId": kept.get("chatId"), "senderId": kept.get("senderId"),
            "seq": kept.get("seq", 0), "messageType": kept.get("messageType", ""),
            "timestamp": kept.get("timestamp") or ""})
    for chat in client.chats():
        before = None
        for _ in range(FIND_PAGES):
            page = client.history(chat["chatId"], FIND_PAGE, before)
            found = next((m for m in page if m.id == message_id), None)
            if found is not None:
                return found
            if len(page) < FIND_PAGE:
                break
            before = page[0].seq
    return None

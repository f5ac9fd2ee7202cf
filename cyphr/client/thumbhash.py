"""
ThumbHash (Evan Wallace, https://evanw.github.io/thumbhash/): an image's
placeholder in about 25 bytes, which a reader shows, blurred, before the
thumbnail or the file arrives. Written here from the published algorithm;
the image is at most 100 x 100 pixels (the caller scales it down first).

The hash, byte for byte (little-endian bit fields)::

    bytes 0-2  l_dc (6 bits) | p_dc (6) | q_dc (6) | l_scale (5) | has_alpha (1)
    bytes 3-4  l_count (3) | p_scale (6) | q_scale (6) | is_landscape (1)
    byte  5    a_dc (4) | a_scale (4)                     with alpha only
    then       4-bit AC coefficients, low nibble first: L, P, Q, then A

The colour is split into luminance L = (r + g + b) / 3, yellow-blue
P = (r + g) / 2 - b and red-green Q = r - g (and alpha A), each reduced by
a DCT to its average (DC) and a few low frequencies (AC) in a triangle of
nx x ny: up to 7 x 7 for L (5 x 5 with alpha), 3 x 3 for P and Q, 5 x 5 for
A. ``l_count`` is the L size of the shorter side, so the aspect ratio reads
back from the header alone.

Only the encoder and the two tiny readers of the header are here: a
client that shows the placeholder decodes it with any ThumbHash library.
Rounding is JavaScript's ``Math.round`` (halves up) and every sum runs in
the reference implementation's order, in doubles, so the bytes are the
reference's, but for a term that lands on a rounding half, where two
platforms' cosines may round apart by a bit (a placeholder a shade off).
"""

from __future__ import annotations

import math

MAX_SIDE = 100  # the encoder's limit on each side, in pixels
HEADER_BYTES = 5


class ThumbHashError(ValueError):
    """An image the encoder cannot take, or bytes that are no hash."""


def _round(value: float) -> int:
    """JavaScript's Math.round: the nearest integer, halves up."""
    return math.floor(value + 0.5)


def _encode_channel(channel: list[float], w: int, h: int, nx: int, ny: int
                    ) -> tuple[float, list[float], float]:
    """The DC term, the AC terms mapped to 0..1 by their largest magnitude,
    and that magnitude (the scale), of ``channel`` (w x h, row by row), for
    the frequencies (cx, cy) with cx * ny < nx * (ny - cy)."""
    dc, scale = 0.0, 0.0
    ac: list[float] = []
    rows_fy = [[math.cos(math.pi / h * cy * (y + 0.5)) for y in range(h)] for cy in range(ny)]
    for cy in range(ny):
        fys = rows_fy[cy]
        cx = 0
        while cx * ny < nx * (ny - cy):
            fx = [math.cos(math.pi / w * cx * (x + 0.5)) for x in range(w)]
            f = 0.0
            for y in range(h):
                fy = fys[y]
                row = y * w
                for x in range(w):
                    f += channel[row + x] * fx[x] * fy
            f /= w * h
            if cx or cy:
                ac.append(f)
                scale = max(scale, abs(f))
            else:
                dc = f
            cx += 1
    if scale:
        ac = [0.5 + 0.5 / scale * f for f in ac]
    return dc, ac, scale


def rgba_to_thumbhash(width: int, height: int, rgba: bytes | bytearray | memoryview) -> bytes:
    """The ThumbHash of an image of ``width`` x ``height`` pixels (each 1 to
    100), ``rgba`` its pixels row by row, 4 bytes each, not premultiplied."""
    w, h = width, height
    if not (isinstance(w, int) and isinstance(h, int) and 1 <= w <= MAX_SIDE
            and 1 <= h <= MAX_SIDE):
        raise ThumbHashError(f"the image is {w} x {h}: each side is 1 to {MAX_SIDE} pixels")
    pixels = memoryview(rgba).cast("B")
    if len(pixels) != w * h * 4:
        raise ThumbHashError(f"{len(pixels)} bytes are not the RGBA of {w} x {h} pixels")
    count = w * h

    # The average colour, each pixel weighted by its alpha.
    avg_r = avg_g = avg_b = avg_a = 0.0
    for j in range(0, 4 * count, 4):
        alpha = pixels[j + 3] / 255
        avg_r += alpha / 255 * pixels[j]
        avg_g += alpha / 255 * pixels[j + 1]
        avg_b += alpha / 255 * pixels[j + 2]
        avg_a += alpha
    if avg_a:
        avg_r /= avg_a
        avg_g /= avg_a
        avg_b /= avg_a

    has_alpha = avg_a < count
    l_limit = 5 if has_alpha else 7  # fewer luminance terms when alpha needs room
    longest = max(w, h)
    lx = max(1, _round(l_limit * w / longest))
    ly = max(1, _round(l_limit * h / longest))

    # RGBA to LPQA, each pixel composited over the average colour.
    l: list[float] = []
    p: list[float] = []
    q: list[float] = []
    a: list[float] = []
    for j in range(0, 4 * count, 4):
        alpha = pixels[j + 3] / 255
        r = avg_r * (1 - alpha) + alpha / 255 * pixels[j]
        g = avg_g * (1 - alpha) + alpha / 255 * pixels[j + 1]
        b = avg_b * (1 - alpha) + alpha / 255 * pixels[j + 2]
        l.append((r + g + b) / 3)
        p.append((r + g) / 2 - b)
        q.append(r - g)
        a.append(alpha)

    l_dc, l_ac, l_scale = _encode_channel(l, w, h, max(3, lx), max(3, ly))
    p_dc, p_ac, p_scale = _encode_channel(p, w, h, 3, 3)
    q_dc, q_ac, q_scale = _encode_channel(q, w, h, 3, 3)
    channels = [l_ac, p_ac, q_ac]

    is_landscape = w > h
    header24 = (_round(63 * l_dc) | (_round(31.5 + 31.5 * p_dc) << 6)
                | (_round(31.5 + 31.5 * q_dc) << 12) | (_round(31 * l_scale) << 18)
                | (int(has_alpha) << 23))
    header16 = ((ly if is_landscape else lx) | (_round(63 * p_scale) << 3)
                | (_round(63 * q_scale) << 9) | (int(is_landscape) << 15))
    hash_ = bytearray([header24 & 255, (header24 >> 8) & 255, header24 >> 16,
                       header16 & 255, header16 >> 8])
    if has_alpha:
        a_dc, a_ac, a_scale = _encode_channel(a, w, h, 5, 5)
        hash_.append(_round(15 * a_dc) | (_round(15 * a_scale) << 4))
        channels.append(a_ac)

    # The AC terms, 4 bits each, two to a byte, the first in the low half.
    start = len(hash_)
    index = 0
    for ac in channels:
        for f in ac:
            if index % 2 == 0:
                hash_.append(0)
            hash_[start + index // 2] |= _round(15 * f) << (4 * (index % 2))
            index += 1
    return bytes(hash_)


def _header(hash_: bytes) -> None:
    if not isinstance(hash_, (bytes, bytearray)) or len(hash_) < HEADER_BYTES:
        raise ThumbHashError(f"a ThumbHash is at least {HEADER_BYTES} bytes")
    if hash_[2] & 0x80 and len(hash_) < HEADER_BYTES + 1:
        raise ThumbHashError("a ThumbHash with alpha has its alpha byte")


def thumbhash_to_approximate_aspect_ratio(hash_: bytes) -> float:
    """The image's width / height, as the hash keeps it (roughly: the
    number of luminance terms along each side, out of 7, or 5 with alpha)."""
    _header(hash_)
    has_alpha = bool(hash_[2] & 0x80)
    longest = 5 if has_alpha else 7
    shortest = hash_[3] & 7
    is_landscape = bool(hash_[4] & 0x80)
    lx, ly = (longest, shortest) if is_landscape else (shortest, longest)
    if not lx or not ly:
        raise ThumbHashError("the hash gives a side no luminance term")
    return lx / ly


def thumbhash_to_average_rgba(hash_: bytes) -> tuple[float, float, float, float]:
    """The image's average colour, red, green, blue and alpha from 0 to 1
    (not premultiplied)."""
    _header(hash_)
    header = hash_[0] | (hash_[1] << 8) | (hash_[2] << 16)
    l = (header & 63) / 63
    p = ((header >> 6) & 63) / 31.5 - 1
    q = ((header >> 12) & 63) / 31.5 - 1
    a = (hash_[5] & 15) / 15 if header >> 23 else 1.0
    b = l - 2 / 3 * p
    r = (3 * l - b + q) / 2
    g = r - q
    return (min(1.0, max(0.0, r)), min(1.0, max(0.0, g)), min(1.0, max(0.0, b)), a)

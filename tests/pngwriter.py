"""A minimal PNG encoder for tests, independent of Pillow and OpenCV: it writes the exact
bytes the PNG spec defines, so readers are checked against files built without them."""
import struct
import zlib

import numpy as np


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, array, bit_depth=8):
    """Write (H, W) grey or (H, W, 3|4) RGB[A] `array` with filter type 0 at 8 or 16 bits."""
    array = np.asarray(array)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = array.reshape(height, width * channels).astype(dtype)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
                + _chunk(b"IEND", b""))

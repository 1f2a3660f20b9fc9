"""Writing webdataset shards: ``<key>.<img-ext>`` + ``<key>.txt`` pairs, deterministic (samples in the order given,
fixed mtime/uid/gid) and atomic (a temporary file renamed into place). Read them with :mod:`slugkit.data.shards`."""

from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable

from PIL import Image

from ..common.files import atomic_write_bytes


def encode_image(image: Image.Image, ext: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    elif ext == "png":
        image.save(buf, format="PNG")
    else:
        raise ValueError(f"unsupported image extension {ext!r}")
    return buf.getvalue()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_shard(
    path: str | os.PathLike,
    samples: Iterable[tuple],
    image_ext: str = "jpg",
) -> int:
    """Write ``(key, image, caption[, ext])`` items as one webdataset shard, atomically and deterministically.

    ``image`` is a PIL image (encoded as ``ext``, default ``image_ext``) or already-encoded bytes.

    Keys must not contain dots (webdataset splits the key at the first dot). Returns the number of samples.
    """
    buf = io.BytesIO()
    n = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for item in samples:
            key, image, caption = item[:3]
            ext = item[3] if len(item) > 3 else image_ext
            if "." in os.path.basename(key):
                raise ValueError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
            data = image if isinstance(image, bytes) else encode_image(image, ext)
            _add_bytes(tf, f"{key}.{ext}", data)
            _add_bytes(tf, f"{key}.txt", caption.encode("utf-8"))
            n += 1
    atomic_write_bytes(path, buf.getvalue())
    return n

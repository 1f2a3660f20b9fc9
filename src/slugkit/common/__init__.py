"""The ground floor: small shared pieces that import nothing of slugkit's.

* :mod:`slugkit.common.files` — atomic file and folder writers (temp sibling + rename), the JSON writer;
* :mod:`slugkit.common.tensorfile` — safetensors read/written tensor by tensor with plain file I/O (header checked,
  no memory map, never a pickle);
* :mod:`slugkit.common.errors` — the user-facing errors the CLI turns into one-line messages, and device hints.
"""

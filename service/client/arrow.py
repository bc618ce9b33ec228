"""Arrow IPC streams in and out; pyarrow is imported on first use (the ``arrow`` extra)."""

from __future__ import annotations

from typing import Any


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.ipc  # the package does not import its ipc submodule
    except ImportError:
        raise ImportError("Arrow bodies need pyarrow: install the `arrow` extra") from None
    return pa


def stream_of(table: Any) -> bytes:
    """A ``pyarrow.Table`` as one IPC stream; bytes are taken as a stream already."""
    if isinstance(table, bytes | bytearray | memoryview):
        return bytes(table)
    pa = _pyarrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def read_table(stream: bytes) -> Any:
    return _pyarrow().ipc.open_stream(stream).read_all()

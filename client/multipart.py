"""A streamed multipart/form-data body with a known length and a progress callback per chunk sent."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20

Progress = Callable[[int, int], None]  # (bytes sent so far, total bytes)


@dataclass(frozen=True)
class FilePart:
    name: str  # form field
    path: Path
    filename: str
    content_type: str


@dataclass(frozen=True)
class MultipartBody:
    """Body of ``fields`` (text) then ``files``; iterate it once to stream the bytes."""

    fields: dict[str, str]
    files: list[FilePart]
    boundary: str

    @classmethod
    def build(cls, fields: dict[str, str], files: list[FilePart]) -> MultipartBody:
        return cls(fields, files, f"loramux-{uuid.uuid4().hex}")

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _field_head(self, name: str) -> bytes:
        return f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()

    def _file_head(self, part: FilePart) -> bytes:
        return (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{part.name}"; filename="{part.filename}"\r\n'
            f"Content-Type: {part.content_type}\r\n\r\n"
        ).encode()

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def length(self) -> int:
        """Exact size in bytes (files are measured now, so they must not change before sending)."""
        n = sum(len(self._field_head(k)) + len(v.encode()) + 2 for k, v in self.fields.items())
        n += sum(len(self._file_head(p)) + p.path.stat().st_size + 2 for p in self.files)
        return n + len(self._tail())

    def iter_bytes(self, progress: Progress | None = None) -> Iterator[bytes]:
        """Yield the body in chunks of at most 1 MiB, calling ``progress(sent, total)`` after each."""
        total = self.length()
        sent = 0

        def emit(chunk: bytes) -> bytes:
            nonlocal sent
            sent += len(chunk)
            if progress is not None:
                progress(sent, total)
            return chunk

        for name, value in self.fields.items():
            yield emit(self._field_head(name) + value.encode() + b"\r\n")
        for part in self.files:
            yield emit(self._file_head(part))
            with part.path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield emit(chunk)
            yield emit(b"\r\n")
        yield emit(self._tail())

"""Models a device receives from the source (a device that joins has no bundle; a device that is
moved to another group gets that group's model), verified before anything runs them.

:class:`ModelReceiver` takes one ``Assignment`` (the manifest's entry of the group's model) and
the ``ModelChunk`` messages that follow, in order, into a temporary file; :meth:`~ModelReceiver.finish`
checks its size and SHA-256 against the entry and moves it into the :class:`ModelCache` as
``<sha256>.onnx``. A chunk out of order, for another model, or past the announced size is refused,
and so is a model larger than :data:`~rocoin.runtime.transport.join.MAX_MODEL_BYTES`. Without
chunks (the source knows the device has it) the model is taken from the cache (or another folder
the device trusts, its bundle) and verified again. Nothing unverified is ever loaded: the runner
(:mod:`.runner`) checks size and hash once more when it opens the file.

The cache keeps at most ``max_models`` models, evicting the least recently used.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import format_validation_error
from rocoin.contracts.manifest import GroupModel, file_sha256
from rocoin.runtime.transport.join import MAX_MODEL_BYTES
from rocoin.runtime.transport.protocol import rocoin_pb2

#: Models a device keeps by default (a rejoin or a move back finds its model here).
DEFAULT_MAX_MODELS = 8
_SUFFIX = ".onnx"
#: Name pattern of a download in progress (in the cache folder, renamed once verified).
_PARTIAL = ".incoming-*.part"


class ModelCache:
    """Verified models in ``folder``, named by their SHA-256."""

    def __init__(self, folder: str | os.PathLike[str], max_models: int = DEFAULT_MAX_MODELS) -> None:
        if max_models < 1:
            raise RocoinError(f"max-models = {max_models}: expected at least 1")
        self.folder = Path(folder)
        self.max_models = max_models

    def drop_partial(self) -> None:
        """Delete downloads left by a device that was killed while receiving (never loaded)."""
        if self.folder.is_dir():
            for path in self.folder.glob(_PARTIAL):
                path.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}{_SUFFIX}"

    def hashes(self) -> list[str]:
        """The models held (what a joining device tells the source it need not send)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob(f"*{_SUFFIX}") if len(p.stem) == 64)

    def find(self, model: GroupModel, extra_folders: list[Path] = ()) -> Path | None:
        """The folder holding a verified copy of ``model`` (as ``<sha256>.onnx`` here, or under its
        own file name in ``extra_folders``), None when there is none."""
        candidates = [(self.path(model.sha256), self.folder)] + [(Path(f) / model.file, Path(f)) for f in extra_folders]
        for path, folder in candidates:
            if path.is_file() and path.stat().st_size == model.size_bytes and file_sha256(path) == model.sha256:
                os.utime(path)  # recently used
                return folder
        return None

    def store(self, temporary: Path, sha256: str) -> Path:
        """Move a verified ``temporary`` file in as ``<sha256>.onnx`` and evict beyond the bound."""
        target = self.path(sha256)
        os.replace(temporary, target)
        os.utime(target)
        models = sorted(self.folder.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for old in models[: max(0, len(models) - self.max_models)]:
            if old != target:
                old.unlink(missing_ok=True)
        return target


class ModelReceiver:
    """One assignment's model, from its ``Assignment`` and the chunks that follow."""

    def __init__(self, cache: ModelCache, assignment: rocoin_pb2.Assignment, *, extra_folders: list[Path] = ()) -> None:
        self.cache = cache
        self.epoch = assignment.epoch
        self.group = assignment.group
        self.student_flops = assignment.student_flops
        self.send_model = assignment.send_model
        self.extra_folders = list(extra_folders)
        try:
            self.model = GroupModel.model_validate_json(assignment.model_json)
        except ValidationError as exc:
            raise RocoinError(format_validation_error(exc, "assignment model_json")) from None
        if self.model.group != assignment.group:
            raise RocoinError(f"assignment: group {assignment.group} but its model is group {self.model.group}'s")
        if self.model.size_bytes > MAX_MODEL_BYTES:
            raise RocoinError(f"model size_bytes = {self.model.size_bytes}: expected at most {MAX_MODEL_BYTES}")
        self._file = None
        self._temporary: Path | None = None
        self._hash = hashlib.sha256()
        self.received = 0
        if self.send_model:
            try:
                cache.folder.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(dir=cache.folder, prefix=".incoming-", suffix=".part")
            except OSError as exc:
                raise RocoinError(f"model cache {cache.folder}: {exc.strerror or exc}") from None
            self._file, self._temporary = os.fdopen(fd, "wb"), Path(name)

    def add(self, chunk: rocoin_pb2.ModelChunk) -> None:
        """One chunk, in order; :class:`RocoinError` (and the partial file removed) otherwise."""
        try:
            if not self.send_model:
                raise RocoinError("chunk: the assignment said no model follows")
            if chunk.sha256 != self.model.sha256:
                raise RocoinError(f"chunk: for model {chunk.sha256[:12]!r}, expected {self.model.sha256[:12]!r}")
            if chunk.offset != self.received:
                raise RocoinError(f"chunk offset {chunk.offset}: expected {self.received} (chunks come in order)")
            if self.received + len(chunk.data) > self.model.size_bytes:
                raise RocoinError(f"chunks: more than the model's {self.model.size_bytes} bytes")
            try:
                self._file.write(chunk.data)
            except OSError as exc:  # a full disk: refused like a bad chunk, the device goes on
                raise RocoinError(f"model cache {self.cache.folder}: {exc.strerror or exc}") from None
            self._hash.update(chunk.data)
            self.received += len(chunk.data)
        except RocoinError:
            self.abort()
            raise

    @property
    def complete(self) -> bool:
        return not self.send_model or self.received == self.model.size_bytes

    def finish(self) -> tuple[Path, GroupModel, float]:
        """The folder holding the verified model, its entry (``file`` as found there) and the
        student's FLOPs; :class:`RocoinError` when it is incomplete or does not match."""
        if not self.send_model:
            folder = self.cache.find(self.model, self.extra_folders)
            if folder is None:
                raise RocoinError(f"model {self.model.sha256[:12]}: not in this device's cache and not sent")
            file = self.model.file if folder != self.cache.folder else self.cache.path(self.model.sha256).name
            return folder, self.model.model_copy(update={"file": file}), self.student_flops
        try:
            self._file.close()
            if self.received != self.model.size_bytes:
                raise RocoinError(f"model: {self.received} bytes received, the entry says {self.model.size_bytes}")
            if self._hash.hexdigest() != self.model.sha256:
                raise RocoinError("model: SHA-256 does not match the assignment (tampered or corrupt); refusing to serve it")
            stored = self.cache.store(self._temporary, self.model.sha256)
        except (RocoinError, OSError) as exc:
            self.abort()
            raise RocoinError(str(exc)) from None
        return self.cache.folder, self.model.model_copy(update={"file": stored.name}), self.student_flops

    def abort(self) -> None:
        """Drop the partial file."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._temporary is not None:
            self._temporary.unlink(missing_ok=True)

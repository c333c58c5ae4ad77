"""Compact bodies for the Customized images a worker holds: zstd with a dictionary trained on them.

A held image costs about 1 KB, two thirds of which is its served JSON (about 630 bytes in a typical
catalog). The bodies of one catalog share most of their bytes (field names, paths, partition tables,
icons), so zstd with a dictionary trained on a sample of them shrinks each to about 100 bytes, and
decompressing one costs 1-3 µs. That is what lets a worker hold a million Customized images in well under
1 GiB (see the README's Performance section).

Only Customized bodies are compressed. Public ones appear in every caller's answers and stay as they are;
an org's answers are cached once rendered (readmodel/answers.py), so a Customized body is decompressed
when an answer showing it is rendered again, not on every request.

Until ``train_after`` bodies have been packed they are kept as they are, and they are the training sample.
A body kept as is starts with "{" and a compressed one with zstd's magic number (0x28 first), so both kinds
coexist and nothing is ever converted. The dictionary is trained once per process (about 0.1 s, usually
during the warm start, before the worker is ready) and never changes; a catalog whose bodies drift from the
sample compresses less well, never wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zstandard

log = logging.getLogger(__name__)

Sample = bytes | bytearray | memoryview  # what train_dictionary takes (only bytes are given)
_OPEN_BRACE = 0x7B  # the first byte of every JSON object, and never of a zstd frame


class BodyCodec:
    """Packs bodies for holding and unpacks them for serving (``unpack(pack(b)) == b`` always)."""

    __slots__ = ("_compress", "_decompress", "_samples", "dict_size", "level", "train_after")

    def __init__(self, *, train_after: int | None = 2000, dict_size: int = 16_384, level: int = 3) -> None:
        """``train_after``: bodies kept as they are (the training sample) before compressing starts;
        None never compresses."""
        self.train_after = train_after
        self.dict_size = dict_size
        self.level = level
        self._samples: list[Sample] | None = [] if train_after is not None else None
        self._compress: Callable[[bytes], bytes] | None = None
        self._decompress: Callable[[bytes], bytes] | None = None

    @property
    def compressing(self) -> bool:
        return self._compress is not None

    def pack(self, body: bytes) -> bytes:
        compress = self._compress
        if compress is not None:
            # A copy of exactly its size: python-zstandard's result keeps the block of the worst-case
            # output size under it (720 bytes held per ~100-byte body here, against 143 for the copy).
            packed = bytes(memoryview(compress(body)))
            return packed if len(packed) < len(body) else body
        samples = self._samples
        if samples is not None:
            samples.append(body)
            if self.train_after is not None and len(samples) >= self.train_after:
                self._train(samples)
        return body

    def unpack(self, data: bytes) -> bytes:
        if data[0] == _OPEN_BRACE:
            return data
        assert self._decompress is not None  # only a trained codec makes anything but JSON
        return self._decompress(data)

    def _train(self, samples: list[Sample]) -> None:
        self._samples = None  # one attempt per process, whatever its outcome
        try:
            trained = zstandard.train_dictionary(self.dict_size, samples)
            trained.precompute_compress(level=self.level)
            compressor = zstandard.ZstdCompressor(
                level=self.level, dict_data=trained, write_checksum=False, write_dict_id=False
            )
            decompressor = zstandard.ZstdDecompressor(dict_data=trained)
            probe = compressor.compress(samples[0])
            if decompressor.decompress(probe) != samples[0]:  # never expected; never serve it if so
                raise zstandard.ZstdError("round trip differs")
        except zstandard.ZstdError as exc:  # e.g. too few distinct samples: keep bodies as they are
            log.info("held bodies stay uncompressed: no dictionary from %d samples (%s)", len(samples), exc)
            return
        self._compress = compressor.compress
        self._decompress = decompressor.decompress
        probes = samples[:200]
        ratio = sum(len(compressor.compress(s)) for s in probes) / sum(len(s) for s in probes)
        log.info(
            "held Customized bodies are compressed from now on (dictionary of %d bytes from %d bodies; "
            "about %.0f%% of their size)",
            len(trained.as_bytes()),
            len(samples),
            100 * ratio,
        )

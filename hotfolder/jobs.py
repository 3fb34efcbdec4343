"""Values passed between stages, and the errors that send a file to errors/."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a file could not be processed: a fixed list, used in error sidecars and metrics."""

    EMPTY = "empty"
    NOT_A_FILE = "not_a_file"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED = "unsupported_format"
    CORRUPT = "corrupt"
    INFERENCE = "inference_failed"
    ENCODE = "encode_failed"
    REPEATED_FAILURE = "repeated_failure"
    UNREADABLE = "unreadable"  # the daemon may not read the file (permissions)
    NAME_COLLISION = "name_collision"  # collisions: error, and another input has the name
    UNSAFE_PATH = "unsafe_path"  # a symbolic link where an output folder should be
    RECOVERY = "recovery_failed"  # a job left by a stopped daemon that could not be resumed
    NO_SUBJECT = "no_subject"  # a cropped or canvas output, and the matte holds nothing
    TOO_BIG_OUTPUT = "output_too_big"  # max_bytes cannot be met even at the lowest quality


class ImageError(Exception):
    """A file that cannot become outputs. The message completes "<file> ...", e.g. "is empty"."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

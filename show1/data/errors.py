"""Why a manifest row was rejected: a short stable code plus the error text."""

from __future__ import annotations

# The stable reason codes written to quarantine.jsonl (other tools and people filter on them).
REASONS = {
    "malformed_row": "the manifest row could not be parsed",
    "missing_video": "the row names no video",
    "bad_time_span": "start/end are not numbers with 0 <= start < end",
    "bad_split": "split is neither train nor val",
    "duplicate_id": "another row already used this id",
    "empty_caption": "the caption is empty after cleaning",
    "binary_caption": "the caption is binary data, not text",
    "caption_too_short": "the caption is shorter than curate.caption.min_chars",
    "caption_too_long": "the caption is longer than curate.caption.max_chars",
    "path_outside_root": "the path escapes the manifest folder and the allowed roots",
    "unsupported_scheme": "the video is neither a path, a package:// path nor an http(s) URL",
    "missing_file": "the video file does not exist",
    "download_failed": "the URL could not be downloaded",
    "too_large": "the file is larger than the configured limit",
    "empty_file": "the file has zero bytes",
    "undecodable": "PyAV cannot decode the file",
    "no_video_stream": "the file has no video stream",
    "bad_fps": "the frame rate is outside curate.filters",
    "too_small": "the resolution is below curate.filters",
    "resolution_too_large": "the resolution is above curate.filters.max_width/max_height",
    "bad_aspect": "the aspect ratio is outside curate.filters",
    "too_short": "not enough frames for one clip (or shorter than min_duration_s)",
    "too_long": "longer than curate.filters.max_duration_s",
    "static": "consecutive frames barely differ",
    "duplicate": "a near-duplicate of a source kept earlier",
}


class Rejected(Exception):
    """A manifest row that cannot be used; it goes to quarantine, the run goes on."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[Rejected], tuple[str, str]]:  # pickles (to Dask workers) with both fields
        return Rejected, (self.reason, self.message)


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing file, unknown format, missing columns)."""

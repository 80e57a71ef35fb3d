"""Publishing a curation: its index, quarantine and summary replace the previous ones together, or not at all.

They are staged in OUT/publish/, then OUT/publish/COMMIT (the list of names) commits them, then each is moved into
place. A kill before the commit leaves the previous files (the next curation clears the staging); a kill after it
leaves the moves to the next curation (`finish_publication`), which completes them first.
"""

from __future__ import annotations

from show1.data.folder import DataFolder
from show1.faults import fault_point

PUBLISH = "publish"                 # the next index, quarantine and summary, staged before they replace the live ones
PUBLISH_COMMIT = f"{PUBLISH}/COMMIT"


def publish(out: DataFolder, files: dict[str, bytes]) -> None:
    """Replace the published `files` (index, quarantine, summary) together.

    They are staged in OUT/publish/, then OUT/publish/COMMIT (the list of names) commits them, then each is moved
    into place. A kill before the commit leaves the previous files, and the next curation clears the staging; a
    kill after it leaves the move to the next curation (`finish_publication`), which completes it first."""
    for name, data in files.items():  # `curate` cleared what a killed run left here (`finish_publication`)
        out.write_bytes(f"{PUBLISH}/{name}", data)
    fault_point("curate.publish.before_commit")
    out.write_json(PUBLISH_COMMIT, sorted(files))
    fault_point("curate.publish.after_commit")
    finish_publication(out)


def finish_publication(out: DataFolder) -> bool:
    """Complete a committed publication a killed run left half-moved (True), or clear an uncommitted one."""
    committed = out.exists(PUBLISH_COMMIT)
    if committed:
        for name in out.read_json(PUBLISH_COMMIT):
            if out.exists(f"{PUBLISH}/{name}"):
                out.move(f"{PUBLISH}/{name}", name)
        out.remove(PUBLISH_COMMIT)
    for name in out.glob(f"{PUBLISH}/*"):  # an uncommitted staging: the previous files stand
        out.remove(name)
    out.prune(PUBLISH)
    return committed

"""Where a prep run keeps its shards and their state, and how files are written safely.

Layout inside a prep output directory DIR (k = shard index, 5 digits):
  DIR/<split>/part-0000k.tfrecord[.gz]     the records (data_prep.example_proto)
  DIR/state/<split>/part-0000k.json        sidecar: counts, lemma counts, query ids, the
                                           shard's size and CRC32C, and a fingerprint of
                                           input bytes + options
  DIR/state/<split>/part-0000k.rejects.tsv rejected lines of the chunk (no header)
  DIR/state/train/part-0000k.lemmas.txt    one line of space-joined lemmas per train record,
                                           the word2vec corpus

Every file is written under a temporary name and renamed when complete; the sidecar is
written last, so a shard counts as done only when its sidecar exists, its fingerprint
matches the current input bytes and options (data_prep.worker), and the shard has the
recorded size; `verify_content` then checks its bytes against the recorded CRC32C.
"""
import glob
import json
import os
from typing import Callable, Iterable, Optional

from data_prep import tfrecord

STATE_DIR = "state"
REJECTS_HEADER = b"line\tfield\treason\tdetail\traw_line\n"


def shard_file(split: str, index: int, gzip: bool) -> str:
    """Path of shard `index` of `split`, relative to the output directory."""
    return f"{split}/part-{index:05d}.tfrecord" + (".gz" if gzip else "")


def state_file(split: str, index: int, suffix: str) -> str:
    """Path of a sidecar (suffix "json", "rejects.tsv" or "lemmas.txt"), relative to DIR."""
    return f"{STATE_DIR}/{split}/part-{index:05d}.{suffix}"


def tmp_name(path: str) -> str:
    """A hidden temporary name beside path, unique to this host and process (two machines
    sharing DIR never write the same temporary file)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.uname().nodename}-{os.getpid()}")


def remove_stale_temporaries(out_dir: str, split: str, owns: Callable[[int], bool]) -> int:
    """Deletes temporary files left by a killed run for shards `owns(index)` is true of.

    Returns:
      The number of files removed.
    """
    removed = 0
    for directory in (os.path.join(out_dir, split), os.path.join(out_dir, STATE_DIR, split)):
        for path in glob.glob(os.path.join(directory, ".part-*.tmp-*")):
            index = int(os.path.basename(path)[len(".part-"):][:5])
            if owns(index):
                os.remove(path)
                removed += 1
    return removed


def remove_temporaries(directory: str, names: Optional[Iterable[str]] = None) -> int:
    """Deletes temporary files (tmp_name) left in `directory` by a killed or failed run.

    Args:
      directory: where to look (not recursive); a missing directory holds none.
      names: only the temporaries of these file names; None: every temporary there.
    Returns:
      The number of files removed.
    """
    patterns = [f".{name}.tmp-*" for name in names] if names is not None else [".*.tmp-*"]
    removed = 0
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(directory), pattern)):
            os.remove(path)
            removed += 1
    return removed


def write_atomic(path: str, data: bytes) -> None:
    """Writes data to path under a temporary name, then renames it into place.

    Raises:
      OSError: naming `path`, not the temporary (a failed write() names no file at all);
        the temporary is removed.
    """
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from None


def write_json_atomic(path: str, obj: dict) -> None:
    """Writes obj as indented, key-sorted JSON (one trailing newline), atomically."""
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def load_sidecar(out_dir: str, split: str, index: int) -> Optional[dict]:
    """The sidecar of a shard, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(out_dir, state_file(split, index, "json")), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str, sidecar: Optional[dict], fingerprint: Optional[dict] = None) -> bool:
    """Whether a sidecar describes a finished shard whose files are all present.

    Args:
      out_dir: the output directory.
      sidecar: from load_sidecar.
      fingerprint: when given, the sidecar must have been made from these input bytes and
        options.
    """
    if not sidecar or (fingerprint is not None and sidecar.get("fingerprint") != fingerprint):
        return False
    try:
        if os.path.getsize(os.path.join(out_dir, sidecar["file"])) != sidecar["bytes"]:
            return False
        return all(os.path.exists(os.path.join(out_dir, p)) for p in sidecar["sidecars"])
    except (OSError, KeyError, TypeError):
        return False


def verify_content(out_dir: str, sidecar: dict) -> Optional[str]:
    """Checks a complete shard's bytes against the CRC32C its sidecar recorded.

    A sidecar without "crc32c" (written before checksums were recorded) is checked by
    reading every record back through its TFRecord framing CRCs instead.

    Args:
      out_dir: the output directory.
      sidecar: a sidecar for which is_complete() holds.
    Returns:
      None when the shard is intact, else what is wrong (naming the file).
    """
    path = os.path.join(out_dir, sidecar["file"])
    if "crc32c" in sidecar:
        crc, _ = tfrecord.file_crc32c(path)
        if crc != sidecar["crc32c"]:
            return (f"{path}: content does not match its checksum (CRC32C {crc:08x}, "
                    f"recorded {sidecar['crc32c']:08x})")
        return None
    try:
        for _ in tfrecord.read_records(path, gzip=path.endswith(".gz")):
            pass
    except tfrecord.CorruptRecordsError as e:
        return str(e)
    return None

"""Cache entries made by two processes at once (two pytest workers, two sweep shards): the first one published
stays, the second is discarded, and a published entry is never moved aside while another process reads it.

Before: the second process found no entry yet, then renamed the first one's directory to ``.old`` and deleted it
(``atomic_replace_dir``), so a process loading the SmolLM2 conversion or a cached evaluation could lose its files.
"""

from __future__ import annotations

import os

from hf_softmask.continual.checkpointing import publish_dir, publish_once, stage_dir
from hf_softmask.continual.pretraining.result_cache import publish_entry


def _staged(parent, name, text):
    staging = stage_dir(parent, name)
    (staging / "config.json").write_text(text)
    return staging


def test_the_first_published_entry_stays_and_the_second_is_discarded(tmp_path):
    final = tmp_path / "smollm2-135m"
    a, b = _staged(tmp_path, "a", "first"), _staged(tmp_path, "b", "second")  # both staged before either published
    assert publish_once(a, final)
    reader = os.open(final / "config.json", os.O_RDONLY)  # another process reading the published entry
    inode = os.stat(final).st_ino
    assert not publish_once(b, final)
    assert os.stat(final).st_ino == inode and (final / "config.json").read_text() == "first"
    assert os.read(reader, 100) == b"first"
    os.close(reader)
    assert not b.exists() and not final.with_name(final.name + ".old").exists()
    # what the cache did before, when its "not published yet" check raced the other process's rename
    publish_dir(_staged(tmp_path, "c", "third"), final)
    assert os.stat(final).st_ino != inode  # the entry another process was reading was replaced under it


def test_cache_entries_are_published_once(tmp_path):
    entry = tmp_path / "base_evaluation" / "key"
    entry.parent.mkdir()
    assert publish_entry(entry, lambda d: (d / "result.json").write_text("1"))
    inode = os.stat(entry).st_ino
    assert publish_entry(entry, lambda d: (d / "result.json").write_text("2"))  # a second writer: still cached
    assert os.stat(entry).st_ino == inode and (entry / "result.json").read_text() == "1"
    assert sorted(p.name for p in entry.parent.iterdir()) == ["key"]  # no staging left behind

"""Deleting stored parameters and results: the directory backend for real, the bucket's
key layout, and a remover that never fails its fan-out."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

from fanout import retention


def _write(path: Path, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 10)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_a_directory_loses_the_keys_it_is_given_relative_or_absolute(tmp_path: Path) -> None:
    params = _write(tmp_path / "parameters" / "abc")
    result = _write(tmp_path / "0f1e2d")
    keep = _write(tmp_path / "keep")
    d = retention.Directory(tmp_path)
    assert d.delete([retention.parameters_key("abc"), str(result), "never-written"]) == 2
    assert not params.exists() and not result.exists() and keep.exists()


def test_a_directory_sweep_deletes_only_what_is_older_than_the_cutoff(tmp_path: Path) -> None:
    old = [_write(tmp_path / "parameters" / "old", age=7200), _write(tmp_path / "old-result", age=7200)]
    new = _write(tmp_path / "new-result")
    assert retention.sweep(3600, str(tmp_path)) == (2, 20)
    assert not any(p.exists() for p in old) and new.exists()


def test_bucket_keys_sit_under_the_blocks_folder_once() -> None:
    block = SimpleNamespace(bucket_name="b", bucket_folder="fanout/", credentials=SimpleNamespace(get_s3_client=dict))
    b = retention.Bucket(block)
    assert b.key("parameters/abc") == "fanout/parameters/abc"
    assert b.key("fanout/0f1e") == "fanout/0f1e"  # Prefect may hand over a resolved key
    block.bucket_folder = ""
    assert retention.Bucket(block).key("parameters/abc") == "parameters/abc"


def test_a_remover_never_raises_and_skips_empty_keys(tmp_path: Path) -> None:
    _write(tmp_path / "parameters" / "p1")
    r = retention.Remover(str(tmp_path))
    r.add([retention.parameters_key("p1"), None])
    r.flush()
    assert r.deleted == 1 and r.pending == []
    broken = retention.Remover(str(_write(tmp_path / "a-file-not-a-directory")))
    broken.add(["parameters/x"])
    broken.flush()  # logs a warning; the time-to-live sweep deletes it later
    assert broken.deleted == 0


def test_result_key_reads_the_states_result_record() -> None:
    assert retention.result_key(SimpleNamespace(data=SimpleNamespace(storage_key="/s/0f1e"))) == "/s/0f1e"
    assert retention.result_key(SimpleNamespace(data=None)) is None

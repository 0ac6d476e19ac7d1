"""Store format versions: a store of an older format is refused everywhere with a rebuild hint and rebuilt by
`--overwrite`; a store of a newer format is refused with an upgrade hint; neither is ever half-read."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from reliability_support import assert_same_store, one_error_line
from teacher_cache.errors import StoreMismatch
from teacher_cache.store import FORMAT_VERSION, Store


def set_version(store, version) -> None:
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = version
    meta.write_text(json.dumps(doc))


def cli_line(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return one_error_line({"rc": result.exit_code, "stdout": result.stdout, "stderr": result.stderr})


@pytest.mark.parametrize("version, hint", [
    (FORMAT_VERSION - 1, "rebuild it with this cusa: `cusa-cache build ... --overwrite`"),
    (FORMAT_VERSION + 1, "written by a newer cusa: upgrade cusa to read it"),
    ("1.0-beta", "rebuild it with this cusa"),
], ids=["older", "newer", "not-a-number"])
def test_a_store_of_another_format_version_is_refused_everywhere_with_a_hint(version, hint, reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference[0], store)
    set_version(store, version)
    for require_complete in (False, True):
        with pytest.raises(StoreMismatch) as err:
            Store.open(store, require_complete=require_complete)
        assert err.value.field == "format_version" and hint in str(err.value)
        assert f"format version {version}" in str(err.value)
    for command in (["info"], ["verify"], ["neighbors", "--image", "0"]):
        line = cli_line(command[0], store, *command[1:])
        assert f"format version {version}" in line and hint in line


def test_building_into_an_older_format_store_is_refused_and_overwrite_rebuilds_it(server, tiny, reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference[0], store)
    set_version(store, FORMAT_VERSION - 1)
    line = one_error_line(server.run(tiny.build_args(store)))
    assert f"format version {FORMAT_VERSION - 1}" in line and "--overwrite" in line
    result = server.run(tiny.build_args(store, extra=("--overwrite",)))
    assert result["rc"] == 0, result["stderr"]
    assert Store.open(store, require_complete=True).attrs["format_version"] == FORMAT_VERSION
    assert_same_store(store, reference[0])

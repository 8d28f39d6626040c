"""docs/flags.md is generated from the scripts' parsers (scripts/flags_doc.py): it must match them."""
import argparse
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_flags_doc():
    spec = importlib.util.spec_from_file_location("flags_doc", os.path.join(ROOT, "scripts", "flags_doc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_md_matches_the_parsers():
    flags_doc = load_flags_doc()
    with open(flags_doc.OUTPUT, encoding="utf-8") as f:
        on_disk = f.read()
    fresh = flags_doc.generate()
    assert on_disk == fresh, f"docs/flags.md is stale: run `{flags_doc.COMMAND}` and commit docs/flags.md"
    assert flags_doc.stale_message() is None


def test_flags_md_names_every_script_and_no_machine_value(monkeypatch):
    """Every listed script has its block; the text does not change with the machine's CPU count or terminal width."""
    import readers
    flags_doc = load_flags_doc()
    text = flags_doc.generate()
    for module_name in flags_doc.SCRIPTS:
        assert f"## `{module_name}.py`" in text and f"usage: {module_name}.py" in text
    assert "### `data.py show`" in text and "usage: data.py show" in text
    monkeypatch.setattr(readers, "DEFAULT_WORKERS", readers.DEFAULT_WORKERS + 37)
    monkeypatch.setenv("COLUMNS", "61")
    assert flags_doc.generate() == text
    assert os.environ["COLUMNS"] == "61"  # restored after the generator's fixed width


def test_unreachable_parser_is_a_clear_error(monkeypatch):
    flags_doc = load_flags_doc()
    monkeypatch.setattr(flags_doc, "SCRIPTS", ["phantom"])
    monkeypatch.setattr(flags_doc, "ENTRIES", ("get_args",))
    with pytest.raises(flags_doc.FlagsDocError, match=r"phantom\.py has none of get_args\(argv\); update SCRIPTS"):
        flags_doc.generate()
    monkeypatch.setattr(flags_doc, "SCRIPTS", ["no_such_script"])
    with pytest.raises(flags_doc.FlagsDocError, match=r"no_such_script\.py: cannot import it"):
        flags_doc.generate()


def test_entry_that_never_parses_is_refused_and_check_exits_1(monkeypatch, tmp_path, capsys):
    flags_doc = load_flags_doc()
    import phantom
    monkeypatch.setattr(phantom, "main", lambda argv=None: None)  # a main that no longer builds a parser
    with pytest.raises(flags_doc.FlagsDocError, match=r"phantom\.py main\(\[\"--help\"\]\) returned without parsing"):
        flags_doc.generate()
    monkeypatch.undo()
    stale = tmp_path / "flags.md"
    stale.write_text("# Flags\n\nhand-written\n", encoding="utf-8")
    monkeypatch.setattr(flags_doc, "OUTPUT", str(stale))
    assert flags_doc.main(["--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["docs/flags.md differs from the scripts' parsers; run `python scripts/flags_doc.py` and commit the result"]
    assert flags_doc.main([]) == 0 and flags_doc.main(["--check"]) == 0
    assert argparse.ArgumentParser.parse_known_args.__qualname__ == "ArgumentParser.parse_known_args"  # unpatched

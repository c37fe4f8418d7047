"""The CPU extensions' names: one per text and path of every source and header, flags and torch
version, so two checkouts or versions on one machine never rebuild (or load) each other's
library; the loader takes one source (the BN family's kernels) or several (the core's)."""

import shutil

from batchnorm import cpu


def _copy_of_the_sources(tmp_path, monkeypatch):
    """The core's sources and headers copied to ``tmp_path``: another checkout."""
    for name in ("SOURCES", "HEADERS"):
        copies = tuple(tmp_path / path.name for path in getattr(cpu, name))
        for path, copy in zip(getattr(cpu, name), copies, strict=True):
            shutil.copy(path, copy)
        monkeypatch.setattr(cpu, name, copies)
    return tmp_path


def test_name_changes_with_the_text_and_path_of_every_file(tmp_path, monkeypatch):
    name, flags = cpu.build_options()
    assert name.startswith("batchnorm_cpu") and "-ffp-contract=off" in flags
    assert cpu.build_options() == (name, flags)  # deterministic

    other_checkout = _copy_of_the_sources(tmp_path, monkeypatch)
    names = {name, cpu.build_options()[0]}  # same text, other paths
    for path in (*cpu.SOURCES[1:2], *cpu.HEADERS):  # a source, and each header
        path.write_text(path.read_text() + "\n// edited\n")
        names.add(cpu.build_options()[0])
    assert len(names) == 2 + 1 + len(cpu.HEADERS)
    assert all(path.parent == other_checkout for path in (*cpu.SOURCES, *cpu.HEADERS))


def test_one_source_is_named_as_a_list_of_one(tmp_path):
    source = tmp_path / "family_cpu.cpp"
    source.write_text("// one source\n")
    flags = ["-O3"]
    assert cpu.extension_name("base", source, flags) == cpu.extension_name("base", [source], flags)
    # text that moves from one file to the next is another build
    first, second = tmp_path / "a.cpp", tmp_path / "b.cpp"
    first.write_text("int a;\n")
    second.write_text("int b;\n")
    before = cpu.extension_name("base", [first, second], flags)
    first.write_text("int a;\nint b;\n")
    second.write_text("")
    assert cpu.extension_name("base", [first, second], flags) != before


def test_name_changes_with_the_torch_version(monkeypatch):
    name = cpu.build_options()[0]
    monkeypatch.setattr(cpu.torch, "__version__", "0.0.0+other")
    assert cpu.build_options()[0] != name

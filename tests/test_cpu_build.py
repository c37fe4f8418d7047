"""The CPU extension's name: one per source text, source path, flags and torch version, so
two checkouts or versions on one machine never rebuild (or load) each other's library."""

import shutil

from batchnorm import cpu


def test_name_changes_with_the_source_text_and_path(tmp_path, monkeypatch):
    name, flags = cpu.build_options()
    assert name.startswith("batchnorm_cpu") and "-ffp-contract=off" in flags
    assert cpu.build_options() == (name, flags)  # deterministic

    other_checkout = tmp_path / "batchnorm_cpu.cpp"
    shutil.copy(cpu.SOURCE, other_checkout)
    monkeypatch.setattr(cpu, "SOURCE", other_checkout)
    same_text_other_path = cpu.build_options()[0]
    assert same_text_other_path != name

    other_checkout.write_text(other_checkout.read_text() + "\n// edited\n")
    edited = cpu.build_options()[0]
    assert edited not in (name, same_text_other_path)


def test_name_changes_with_the_torch_version(monkeypatch):
    name = cpu.build_options()[0]
    monkeypatch.setattr(cpu.torch, "__version__", "0.0.0+other")
    assert cpu.build_options()[0] != name

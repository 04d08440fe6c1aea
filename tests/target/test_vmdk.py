"""Replica VMDK pairs: descriptor format, names, sizes, never clobbering."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.target import vmdk
from appliance.target.errors import AlreadyExists, InvalidDescriptor, InvalidName, InvalidSize


def test_create_writes_a_monolithic_flat_pair(tmp_path: Path) -> None:
    pair = vmdk.create(tmp_path, "web01-disk0", 10 << 30)
    assert pair.descriptor == (tmp_path / "web01-disk0.vmdk").resolve()
    assert pair.flat == (tmp_path / "web01-disk0-flat.vmdk").resolve()
    assert os.path.getsize(pair.flat) == 10 << 30
    assert os.stat(pair.flat).st_blocks == 0  # sparse: nothing allocated
    text = pair.descriptor.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Disk DescriptorFile"
    assert "version=1" in lines
    assert 'createType="monolithicFlat"' in lines
    assert 'RW 20971520 FLAT "web01-disk0-flat.vmdk" 0' in lines
    assert 'ddb.adapterType = "lsilogic"' in lines
    assert 'ddb.virtualHWVersion = "14"' in lines
    assert 'ddb.geometry.heads = "255"' in lines
    assert 'ddb.geometry.sectors = "63"' in lines
    assert 'ddb.geometry.cylinders = "1305"' in lines  # 20971520 / (255 * 63)
    desc = vmdk.read_descriptor(pair.descriptor)
    assert desc.size == 10 << 30
    assert desc.flat_name == "web01-disk0-flat.vmdk"
    assert desc.adapter_type == "lsilogic"
    assert len(desc.uuid.replace(" ", "").replace("-", "")) == 32


def test_each_descriptor_gets_its_own_uuid(tmp_path: Path) -> None:
    a = vmdk.read_descriptor(vmdk.create(tmp_path, "a", 512).descriptor)
    b = vmdk.read_descriptor(vmdk.create(tmp_path, "b", 512).descriptor)
    assert a.uuid != b.uuid
    assert a.size == 512


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "-lead", ".hidden", "a..b", "x" * 65,
     "sp ace", "ü", "a\nb", "a\0b"],
)  # fmt: skip
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidName):
        vmdk.create(tmp_path, name, 512)
    with pytest.raises(InvalidName):
        vmdk.create_replica(tmp_path, name, 512)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "A9", "disk_0.1-x", "x" * 64])
def test_valid_names(name: str) -> None:
    assert vmdk.validate_name(name) == name


@pytest.mark.parametrize("size", [0, -512, 511, 513, 1000, True, 1.5])
def test_invalid_sizes_are_refused(tmp_path: Path, size: object) -> None:
    with pytest.raises(InvalidSize):
        vmdk.create(tmp_path, "d", size)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_never_clobbers_a_flat_file(tmp_path: Path) -> None:
    (tmp_path / "d-flat.vmdk").write_bytes(b"precious")
    with pytest.raises(AlreadyExists):
        vmdk.create(tmp_path, "d", 1024)
    assert (tmp_path / "d-flat.vmdk").read_bytes() == b"precious"
    assert not (tmp_path / "d.vmdk").exists()


def test_never_clobbers_a_descriptor_and_cleans_up_its_flat(tmp_path: Path) -> None:
    (tmp_path / "d.vmdk").write_text("precious")
    with pytest.raises(AlreadyExists):
        vmdk.create(tmp_path, "d", 1024)
    assert (tmp_path / "d.vmdk").read_text() == "precious"
    assert not (tmp_path / "d-flat.vmdk").exists()


def test_replica_layout_and_second_create_refused(tmp_path: Path) -> None:
    pair = vmdk.create_replica(tmp_path, "disk1", 1 << 20)
    assert pair.descriptor == (tmp_path / "disk1" / "disk1.vmdk").resolve()
    assert vmdk.replica_paths(tmp_path, "disk1") == pair
    with pytest.raises(AlreadyExists):
        vmdk.create_replica(tmp_path, "disk1", 1 << 20)


def test_symlink_out_of_the_datastore_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    datastore = tmp_path / "ds"
    datastore.mkdir()
    (datastore / "evil").symlink_to(outside)
    with pytest.raises(InvalidName):
        vmdk.create_replica(datastore, "evil", 512)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "text",
    [
        'version=1\ncreateType="twoGbMaxExtentSparse"\nRW 8 FLAT "x-flat.vmdk" 0\n',
        'version=1\ncreateType="monolithicFlat"\n',
        'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "../x-flat.vmdk" 0\n',
        'version=2\ncreateType="monolithicFlat"\nRW 8 FLAT "x-flat.vmdk" 0\n',
        "garbage\n",
    ],
)
def test_bad_descriptors_are_refused(text: str) -> None:
    with pytest.raises(InvalidDescriptor):
        vmdk.parse_descriptor(text)

"""The one safetensors reader (`weights.SafetensorsFile`): every dtype safetensors writes reads back
bit for bit (read, or mapped copy-on-write), rows read alone equal the tensor's rows, and a damaged
header or file is named."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from andromeda.folders import CheckpointError
from andromeda.weights import SAFETENSORS_DTYPES, SafetensorsFile


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {}
    for dtype in SAFETENSORS_DTYPES.values():
        values = torch.randn(5, 3) * 100
        out[f"t.{str(dtype).removeprefix('torch.')}"] = values.to(dtype) if dtype != torch.bool else values > 0
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def raw_file(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_every_dtype_reads_back_as_written(tmp_path):
    written = tensors()
    save_file(written, tmp_path / "w.safetensors", metadata={"format": "pt"})
    weights = SafetensorsFile(tmp_path / "w.safetensors")
    assert weights.metadata == {"format": "pt"}
    assert weights.shapes() == {name: tuple(t.shape) for name, t in written.items()}
    with weights:
        read = {name: weights.read(name) for name in weights.entries}
    for name, tensor in written.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
        assert read[name].data_ptr() % 64 == 0  # fresh, aligned memory, as the int8 kernel needs
    out = torch.empty(5, 3, dtype=torch.bfloat16)
    assert weights.read("t.bfloat16", out) is out and torch.equal(out, written["t.bfloat16"])
    mapped = weights.mapped()
    assert all(mapped[n].dtype == t.dtype and torch.equal(mapped[n], t) for n, t in written.items())
    mapped["t.float32"].add_(1)  # copy on write: the file keeps its values
    assert torch.equal(SafetensorsFile(tmp_path / "w.safetensors").read("t.float32"), written["t.float32"])


def test_rows_are_read_alone(tmp_path):
    tensor = torch.arange(60, dtype=torch.float32).view(10, 6)
    save_file({"w": tensor}, tmp_path / "w.safetensors")
    with SafetensorsFile(tmp_path / "w.safetensors") as weights:
        assert torch.equal(weights.read_rows("w", 3, 7), tensor[3:7])
        assert weights.read_rows("w", 10, 10).shape == (0, 6)
        with pytest.raises(IndexError, match="rows 8:11 of tensor w"):
            weights.read_rows("w", 8, 11)


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"ab", r"tensor 'w' is described as .*F8_E4M3"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"abcd", r"tensor 'w' is described as"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"abcd", r"tensor 'w' ends at byte 8 of the "
                                                                            r"data, which holds 4"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"", r"tensor 'w' is described as"),
    ({"__metadata__": ["x"]}, b"", '"__metadata__" is not an object'),
])
def test_a_bad_header_is_named(tmp_path, header, data, message):
    raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors is not a readable safetensors file \(truncated or "
                                              rf"corrupt\?\): {message}"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_a_file_that_is_not_safetensors_or_was_cut_is_named(tmp_path):
    (tmp_path / "text.safetensors").write_text("not safetensors at all")
    with pytest.raises(CheckpointError, match=r"header length \(\d+ bytes\) does not fit the file"):
        SafetensorsFile(tmp_path / "text.safetensors")
    save_file({"w": torch.zeros(100)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors .*tensor 'w' ends at byte 400 of the data, which "
                                              r"holds 390"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data)
    weights = SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])  # cut after the header was read
    with pytest.raises(CheckpointError, match="the file ends inside tensor w"):
        weights.read("w")

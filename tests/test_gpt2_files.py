"""Reading OpenAI's weight files without the safetensors package: the same tensors as its own
loader, from a memory map. (Crafted headers are rows of tests/test_bad_inputs.py.)"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.safe_load import read_safetensors


def test_read_safetensors_equals_the_safetensors_package(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(7).half(),
               "bf16": torch.randn(2, 2).bfloat16(), "f64": torch.randn(5).double(),
               "i64": torch.arange(6).view(2, 3), "u8": torch.arange(9, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "empty": torch.randn(0, 3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    ours = read_safetensors(path)
    # Mapped, not read: the tensors are the page cache's pages, not a copy (Linux's /proc).
    assert str(path) in Path("/proc/self/maps").read_text()
    theirs = load_file(path)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    ours["f32"].add_(1)  # the map is copy-on-write: the file keeps its bytes
    assert torch.equal(read_safetensors(path)["f32"], tensors["f32"])


def test_a_tensor_at_an_unaligned_offset_is_copied(tmp_path):
    # The format does not promise alignment: a float32 one byte into the data cannot be viewed.
    values = torch.tensor([1.5, -2.0, 3.25])
    head = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}).encode()
    head += b" " * (-len(head) % 8)  # so that the data itself starts aligned
    (tmp_path / "m.safetensors").write_bytes(
        len(head).to_bytes(8, "little") + head + b"\0" + values.numpy().tobytes())
    assert torch.equal(read_safetensors(tmp_path / "m.safetensors")["x"], values)

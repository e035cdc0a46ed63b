"""`inference.huge_pages`: a model's weights moved to 2 MiB pages where Linux offers them (checked
in /proc/self/smaps), bytes unchanged, nothing done where it cannot be, and the inference loader
doing it."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from andromeda.checkpoint import load_for_inference, loader, save_pretrained
from andromeda.inference import huge_pages
from helpers import random_net

MIB = 1 << 20


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (bytes)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                start, end = (int(part, 16) for part in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    return 0


def fresh_advised_huge_bytes(nbytes: int = 64 * MIB) -> int:
    """A control independent of the code under test: AnonHugePages of a fresh private anonymous
    mapping advised MADV_HUGEPAGE, then written (0: Linux has no free 2 MiB page just now)."""
    size = huge_pages.huge_page_size()
    region = mmap.mmap(-1, nbytes + size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(region)
    start = -(-ctypes.addressof(view) // size) * size
    huge_pages._madvise()(start, nbytes, huge_pages.MADV_HUGEPAGE)
    ctypes.memset(start, 1, nbytes)
    huge = huge_bytes_at(start)
    del view
    region.close()
    return huge


def test_large_weights_move_to_huge_pages_unchanged():
    size = huge_pages.huge_page_size()
    module = nn.Linear(1024, 2048)  # an 8 MiB weight, a bias of 8 KiB (no whole page: left alone)
    nn.init.normal_(module.weight, generator=torch.Generator().manual_seed(0))
    before = module.weight.detach().clone()
    collapsed = huge_pages.back_with_huge_pages(module)
    assert torch.equal(module.weight, before)
    if size is None:  # not Linux, or transparent huge pages are off
        assert collapsed == 0
        return
    whole_pages = huge_pages._aligned_span(module.weight, size)[1]
    assert whole_pages >= 6 * MIB and huge_pages._aligned_span(module.bias, size) is None
    if collapsed == 0:
        pytest.skip("this kernel refused MADV_COLLAPSE (older than Linux 6.1, or not permitted)")
    assert collapsed == whole_pages
    assert huge_bytes_at(module.weight.data_ptr() + whole_pages // 2) >= whole_pages


REUSED = """
import ctypes, sys
import torch
sys.path.insert(0, {tests!r})
from test_huge_pages import fresh_advised_huge_bytes, huge_bytes_at
from andromeda.inference import huge_pages, native
libc = ctypes.CDLL(None)
if hasattr(libc, "mallopt"):  # glibc
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: freed blocks stay in the heap, their pages faulted
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks come from the heap
weight = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0)).bfloat16()  # 16 MiB
used = [torch.ones(17 << 20, dtype=torch.uint8) for _ in range(3)]  # written in 4 KiB pages
pin = torch.ones(1000)  # keeps the heap's top above them
del used
tiles = native.to_row_tiles(weight)  # torch.empty would hand back the freed, faulted blocks
assert torch.equal(native.from_row_tiles(tiles, 0, 4096), weight)
size = huge_pages.huge_page_size()
print(tiles.nbytes, tiles.data_ptr() % size, huge_bytes_at(tiles.data_ptr()), fresh_advised_huge_bytes(tiles.nbytes))
"""


def test_row_tiles_are_written_into_huge_pages():
    """A kernel's layout made at load (`native.to_row_tiles`) lands in 2 MiB pages as it is written,
    with no collapse afterwards, even where the allocator would hand back memory it had faulted in
    4 KiB pages (a child whose glibc keeps freed blocks in the heap); the bytes are the layout's."""
    if huge_pages.huge_page_size() is None:
        pytest.skip("transparent huge pages are off or not Linux")
    child = subprocess.run([sys.executable, "-c", REUSED.format(tests=str(Path(__file__).parent))],
                           capture_output=True, text=True, timeout=120, check=True)
    nbytes, misalignment, huge, control = (int(field) for field in child.stdout.split())
    if control < nbytes:  # the advice is a hint: a fault takes 4 KiB pages while Linux has no free 2 MiB one
        pytest.skip("Linux had too few free 2 MiB pages for an advised allocation just now (fragmented memory)")
    assert nbytes == 16 * MIB and misalignment == 0 and huge >= nbytes


def test_small_layouts_stay_with_the_allocator():
    """Under a huge page, `empty_in_huge_pages` is torch.empty; from one up, a tensor of the shape
    and dtype whose storage is its own bytes (what `back_with_huge_pages` would advise and collapse)
    starting at a huge page's boundary, writable."""
    small = huge_pages.empty_in_huge_pages(1000, dtype=torch.bfloat16)
    assert small.shape == (1000,) and small.dtype == torch.bfloat16
    size = huge_pages.huge_page_size()
    large = huge_pages.empty_in_huge_pages(3, 1 << 20, dtype=torch.float32)
    assert large.shape == (3, 1 << 20) and large.dtype == torch.float32 and large.is_contiguous()
    assert large.untyped_storage().nbytes() == large.nbytes
    large.fill_(2.5)
    assert float(large.sum()) == 2.5 * 3 * (1 << 20)
    if size is not None and large.nbytes >= size:  # (huge pages of 32 or 512 MiB on some ARM64 kernels)
        assert large.data_ptr() % size == 0
    assert huge_pages.empty_in_huge_pages((3, 1 << 20), dtype=torch.float32).shape == (3, 1 << 20)  # a shape


def test_the_advice_stays_inside_the_tensors_mapping(monkeypatch):
    """A size that is no whole number of huge pages: the range advised (whole huge pages from the
    tensor's start) lies inside the mapping made for it, never in a neighbour's."""
    size = huge_pages.huge_page_size()
    if size is None:
        pytest.skip("transparent huge pages are off or not Linux")
    calls, regions, real_mmap = [], [], mmap.mmap

    def recorded(*args, **kwargs):
        regions.append(real_mmap(*args, **kwargs))
        return regions[-1]

    monkeypatch.setattr(huge_pages, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    monkeypatch.setattr(mmap, "mmap", recorded)
    tensor = huge_pages.empty_in_huge_pages(size + 4096, dtype=torch.uint8)
    (start, length, advice), = calls
    assert advice == huge_pages.MADV_HUGEPAGE and start == tensor.data_ptr() and length == 2 * size
    view = ctypes.c_char.from_buffer(regions[0])
    low, high = ctypes.addressof(view), ctypes.addressof(view) + len(regions[0])
    del view
    assert low <= start and start + length <= high


def test_nothing_happens_where_huge_pages_are_unavailable(monkeypatch):
    calls = []
    monkeypatch.setattr(huge_pages, "huge_page_size", lambda: None)
    monkeypatch.setattr(huge_pages, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    assert huge_pages.back_with_huge_pages(nn.Linear(1024, 2048)) == 0
    assert calls == []


def test_each_storage_is_advised_once_within_its_bounds(monkeypatch):
    """Views share one span, meta tensors are skipped, tensors held as plain attributes (the
    decode kernels' prepared scales) count, and every span lies inside its storage."""
    calls = []
    monkeypatch.setattr(huge_pages, "huge_page_size", lambda: 2 * MIB)
    monkeypatch.setattr(huge_pages, "_madvise", lambda: lambda start, length, advice: calls.append(
        (start, length, advice)) or 0)
    module = nn.Module()
    module.a = nn.Parameter(torch.zeros(4 * MIB))
    module.register_buffer("b", module.a.data[MIB:])  # a view of the same storage: one span
    module.inner = nn.Module()
    module.inner.prepared = (torch.zeros(2 * MIB), None)  # as `_decode_weight` holds its tensors
    with torch.device("meta"):
        module.c = nn.Parameter(torch.zeros(4 * MIB))
    assert huge_pages.back_with_huge_pages(module) >= 20 * MIB
    assert [advice for _, _, advice in calls] == [huge_pages.MADV_HUGEPAGE, huge_pages.MADV_COLLAPSE] * 2
    for (start, length, _), tensor in zip(calls[::2], (module.a, module.inner.prepared[0])):
        storage = tensor.untyped_storage()
        assert start % (2 * MIB) == 0 and length % (2 * MIB) == 0
        assert storage.data_ptr() <= start and start + length <= storage.data_ptr() + storage.nbytes()


def test_the_inference_loader_backs_the_model_it_returns(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loader, "back_with_huge_pages", lambda module: seen.append(module) or 0)
    save_pretrained(random_net(), tmp_path / "model")
    net = load_for_inference(tmp_path / "model")
    assert seen == [net]


CHILD = """
import os, sys
from andromeda.cli import allocate_with_huge_pages
asked = allocate_with_huge_pages(os.environ)
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)  # a fresh 64 MiB activation-sized allocation
sys.path.insert(0, {tests!r})
from test_huge_pages import fresh_advised_huge_bytes, huge_bytes_at
print(asked, huge_bytes_at(x.data_ptr() + (32 << 20)), fresh_advised_huge_bytes())
"""


@pytest.mark.parametrize("preset", [None, "0"])
def test_the_command_allocates_in_huge_pages_unless_told_not_to(preset):
    """`andromeda`'s entry sets THP_MEM_ALLOC_ENABLE before PyTorch loads, so a fresh allocation
    of the process lands in huge pages; a preset THP_MEM_ALLOC_ENABLE=0 is respected."""
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    child = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent))], env=env,
                           capture_output=True, text=True, timeout=120, check=True)
    asked, huge, control = child.stdout.split()
    if huge_pages.huge_page_size() is None:  # not Linux, or transparent huge pages are off
        assert (asked, huge) == ("False", "0")
        return
    assert asked == str(preset is None)
    if preset is None:
        if int(huge) == 0 and int(control) == 0:  # a fault takes 4 KiB pages while Linux has no 2 MiB one
            pytest.skip("Linux had no free 2 MiB page for an advised allocation just now (fragmented memory)")
        assert int(huge) >= 2 * MIB
    elif "[madvise]" in huge_pages.THP_SETTING.read_text():  # under "always" every range may be huge
        assert int(huge) == 0

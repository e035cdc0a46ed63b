"""`inference.native.KernelLibrary`, the training kernels' shared loader: where a kernel cannot run it
says why, the model keeps PyTorch's ops, and a call into it names what to set instead."""

import ctypes
import logging

import pytest

from andromeda.inference import native
from andromeda.inference.native import KernelLibrary


def test_a_missing_cpu_feature_is_named_and_no_kernel_is_offered(tmp_path, caplog):
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 7; }\n")
    library = KernelLibrary("the test kernel", source, ("-O2", "-shared", "-fPIC"), ("no_such_feature",),
                            "set the model's thing to None")
    assert library.unavailable_reason() == "this CPU lacks no_such_feature"
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert library.offer(len, "PyTorch's ops run instead") is None
    assert "the test kernel not used: this CPU lacks no_such_feature; PyTorch's ops run instead" in caplog.text
    with pytest.raises(RuntimeError, match="the test kernel cannot run here: this CPU lacks no_such_feature; "
                                           "set the model's thing to None"):
        library.function("f", [])


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_a_failed_build_is_the_reason_and_a_good_one_gives_typed_functions(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path / "cache")
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return }\n")
    library = KernelLibrary("the broken kernel", broken, ("-O2", "-shared", "-fPIC"), (), "fix it")
    assert library.unavailable_reason().startswith("building broken.c failed")
    source = tmp_path / "good.c"
    source.write_text("double twice(double x) { return 2 * x; }\n")
    library = KernelLibrary("the good kernel", source, ("-O2", "-shared", "-fPIC"), (), "fix it")
    assert library.unavailable_reason() is None
    assert library.offer(len, "") is len
    twice = library.function("twice", [ctypes.c_double], ctypes.c_double)
    assert twice(1.25) == 2.5 and library.function("twice", [ctypes.c_double]) is twice

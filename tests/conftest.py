"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A small teacher as a user's checkpoint holds it: a plain timm resnet10t state dict, seeded
    (compiling it costs seconds, not a minute). test_multi.py overrides it with a smaller one."""
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)
    return path

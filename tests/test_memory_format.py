"""The students' memory format: `--channels-last`, `--no-channels-last`, and auto (the default),
which on a CPU keeps small plain convnets in NCHW (their convolutions train faster so there) and
everything else channels-last (`fastseed.models.student_channels_last`)."""
from contextlib import nullcontext

import pytest
import timm
import torch
from torch import nn

from fastseed.cli import config_from_args
from fastseed.config import Config
from fastseed.methods import SimReg
from fastseed.models import student_channels_last
from fastseed.runtime import setup_env
from fastseed.students import Student, Students, build_student

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("arch,res,device,want", [
    ("resnet18", 32, CPU, False),          # plain convolutions at 32 px: NCHW on a CPU
    ("resnet18", 64, CPU, False),
    ("resnet18", 96, CPU, True),           # larger inputs: channels-last
    ("resnet18", 224, CPU, True),
    ("efficientnet_b0", 32, CPU, True),    # depthwise convolutions: channels-last at any size
    ("mobilenetv3_large_100", 32, CPU, True),
    ("resnet18", 32, CUDA, True),          # CUDA: always channels-last
])
def test_auto_picks_by_device_convolutions_and_size(arch, res, device, want):
    model = timm.create_model(arch, num_classes=0)
    assert student_channels_last(None, model, res, device) is want
    assert student_channels_last(True, model, res, device) is True  # a given setting wins
    assert student_channels_last(False, model, res, device) is False


def test_flags():
    assert config_from_args([]).channels_last is None
    assert config_from_args(["--channels-last"]).channels_last is True
    assert config_from_args(["--no-channels-last"]).channels_last is False


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("setting,want", [(None, False), (True, True), (False, False)])
def test_a_built_student_has_the_format_it_reports(setting, want):
    cfg = Config(method="simreg", arch="resnet10t", res=32, device="cpu", compile="off", precision="fp32",
                 channels_last=setting, head="linear")
    s = build_student(cfg, setup_env(cfg), 16, None, None)
    assert s.channels_last is want
    assert _is_cl(s.method.student.conv1[0].weight) is want


class Probe(nn.Module):
    """One convolution that records the memory format of each input it sees."""
    num_features = 4

    def __init__(self, channels_last: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        if channels_last:
            self.conv.to(memory_format=torch.channels_last)
        self.seen = []

    def forward(self, x):
        self.seen.append((_is_cl(x), x.data_ptr()))
        return self.conv(x).mean((2, 3))


def test_each_student_sees_its_own_format_and_the_nchw_copy_is_made_once():
    members = []
    for cl in (False, True, False):
        torch.manual_seed(0)
        method = SimReg(Probe(cl), None, dim=8, head="linear")
        opt = torch.optim.SGD(method.parameters(), lr=0.1)
        members.append(Student(Config(method="simreg", clip_grad=None), method, method, opt, None, 0.1,
                               channels_last=cl))
    x = torch.randn(6, 3, 10, 10).contiguous(memory_format=torch.channels_last)  # as the augmentation writes
    Students(members).step([x], (torch.randn(6, 8),), 0, nullcontext)
    (nchw_a,), (cl,), (nchw_b,) = (m.method.student.seen for m in members)
    assert cl == (True, x.data_ptr())          # the channels-last student gets the views as they are
    assert nchw_a[0] is False and nchw_b[0] is False
    assert nchw_a[1] == nchw_b[1] != x.data_ptr()  # one NCHW copy, shared by both NCHW students


@pytest.mark.parametrize("setting,want", [(None, True), (True, True), (False, False)])
def test_the_teacher_is_channels_last_unless_told_not_to(setting, want):
    """The bundled EfficientNet-Lite0 teacher on a CPU: channels-last under auto (its depthwise
    convolutions run about 1.3x faster so here, in fp32 and bf16 alike)."""
    from fastseed.targets import build_targets
    cfg = Config(device="cpu", compile="off", channels_last=setting, teacher_arch="efficientnet_lite0")
    source = build_targets(cfg, CPU, dtype=None, compile_fn=None)
    convs = [m.weight for m in source.teacher.model.modules()  # the layouts differ where C_in > 1 and k > 1
             if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.weight.shape[1] > 1]
    assert convs and all(_is_cl(w) is want for w in convs)

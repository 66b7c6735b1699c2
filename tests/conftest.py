"""Fixtures shared by several test files; helpers that are not fixtures are in helpers.py."""
import pytest
import torch

from fastseed._ffcv import keep_torch_threads

# Before any test module imports FFCV (test_folders.py does at collection): FFCV would otherwise set
# this whole session to one torch thread, and a later test's in-process reference run would differ
# from its subprocess run.
keep_torch_threads()


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A small teacher as a user's checkpoint holds it: a plain timm resnet10t state dict, seeded
    (compiling it costs seconds, not a minute). test_multi.py overrides it with a smaller one."""
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """fmnist(split, n, jpeg=0.0) -> the path of a beton of the first n images (in
    `subset_indices` order) of Fashion-MNIST's `split`, a share `jpeg` of them JPEG-encoded. Each
    one is written once per session and shared by every test file: tests only read them."""
    from fastseed.data_prep import write_beton
    root, made = tmp_path_factory.mktemp("betons"), {}

    def make(split: str, n: int, jpeg: float = 0.0):
        key = (split, n, jpeg)
        if key not in made:
            made[key] = root / f"fmnist_{split}_{n}_jpeg{jpeg}.beton"
            write_beton(f"fashion-mnist:{split}", str(made[key]), subset=n, compress_probability=jpeg, progress=False)
        return made[key]

    return make

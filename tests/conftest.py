import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("OMNISTREAM_TEST_DEVICE", "cpu").startswith("cuda"):
    import torch

    # fp32 parity means fp32 products: no TF32 in matmuls or cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """One tiny random checkpoint (released layout) shared by the whole test session."""
    from omnistream.maketiny import make_tiny

    d = tmp_path_factory.mktemp("tiny")
    make_tiny(d, seed=0)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The training tests' synthetic set (``train.synth.make_dataset``: spoken and written
    questions about generated images, with speech codes and DPO pairs), one per test module."""
    from omnistream.train.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("train_data"), n=16, media=True, dpo=True)

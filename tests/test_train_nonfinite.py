"""A training run whose loss stops being finite ends with a one-line error that names the step and the run's lr,
on the UNet and on a DiT, and writes no adapter (a non-finite result is an error, never a file)."""

import pytest

from catfast.errors import CatfastError
from catfast.integrations.factory_dit import init_dit_folder
from catfast.train.config import TrainConfig
from catfast.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", ["unet", "tiny-flux"])
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_lr(model, tiny, data, tmp_path):
    base = tiny if model == "unet" else init_dit_folder(model, tmp_path / model)
    # lr 1e30: Adam's first step moves every LoRA weight by ~1e30, so the next forward overflows
    config = TrainConfig(base=str(base), data=str(data), trigger="sks", out=str(tmp_path / "run"), steps=5,
                         lr=1e30, rank=2, batch_size=1, resolution=32, device="cpu", checkpoint_every=0)  # fmt: skip
    with pytest.raises(CatfastError) as e:
        train(config, progress=False)
    message = str(e.value)
    assert message.startswith("the loss is ") and "at step " in message and "lower the lr (1e+30)" in message
    assert int(message.split("at step ")[1].split(";")[0]) > 1  # step 1 still ran on the initial weights
    assert not list((tmp_path / "run").glob("*.safetensors"))

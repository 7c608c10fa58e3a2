"""The batched sampler checks its final latents once (issue 27, "finite outputs or an error"): NaN or Inf
at the end is an error that names the likely causes, not a black picture (what b9a3351 returned)."""

import pytest
import torch

from catfast.errors import CatfastError
from catfast.eval.sampler import sample_images
from catfast.integrations.models import load_base

pytestmark = pytest.mark.usefixtures("one_thread")


def test_non_finite_latents_are_an_error_naming_the_causes():
    base = load_base("demo")
    ok = sample_images(base, ["a star"], adapters=[None], seeds=[0], steps=2, output="latents")
    assert torch.isfinite(ok[0]).all()
    with torch.no_grad():
        base.unet.conv_out.bias[0] = float("nan")  # as a damaged checkpoint would hold
    with pytest.raises(CatfastError, match=r"NaN/Inf latents in 2 of 2 rows .*guidance 7\.5"):
        sample_images(base, ["a star", "a ball"], adapters=[None, None], seeds=[0, 1], steps=2, guidance=7.5)

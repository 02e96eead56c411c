"""Our generation computes what plain diffusers computes (BENCHMARKS.md says so; this checks it).

On each tiny checkpoint (text and image where the layout takes them, classifier-free guidance on),
the frames our pipeline hands to the video encoder are compared with ``WanPipeline`` /
``WanImageToVideoPipeline`` loaded with ``from_pretrained`` and called plainly with the same seed
and settings (``output_type="np"``, scaled to 0-255 and rounded as our frames are).

Tolerance: none. On a CPU in float32 both run the same operations in the same order (our path
splits ``__call__`` into text encode, denoise to latents, and our own de-normalisation and decode,
with the frames streamed from a decoder hook), so the frames must be bit-identical; a difference
of even one level means our path no longer computes what diffusers does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

from tests.harness.payloads import png_base64

CASES = [
    pytest.param("ti2v-5b", False, id="ti2v-5b-text"),
    pytest.param("ti2v-5b", True, id="ti2v-5b-image"),
    pytest.param("t2v-a14b", False, id="t2v-a14b-text"),
    pytest.param("i2v-a14b", True, id="i2v-a14b-image"),
]
BODY = {"prompt": "a red fox running through fresh snow", "negative_prompt": "blurry", "seed": 11,
        "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 3}


def _plain_frames(checkpoint, request, with_image: bool, flow_shift: float) -> np.ndarray:
    pipeline_class = WanImageToVideoPipeline if with_image else WanPipeline
    pipe = pipeline_class.from_pretrained(str(checkpoint), dtype=torch.float32, local_files_only=True)
    # The checkpoint carries another shift; the variant's own is a setting of the call, as ours.
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"image": request.image} if with_image else {}
    if request.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = request.guidance_scale_2
    video = pipe(
        prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
        width=request.width, num_frames=request.num_frames, num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np", **kwargs,
    ).frames[0]
    return (torch.from_numpy(video).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("layout, with_image", CASES)
def test_frames_before_encoding_equal_plain_diffusers(services, tiny_checkpoints, layout, with_image):
    service = services[layout]
    body = dict(BODY, **({"image": png_base64(64, 64)} if with_image else {}))
    request = service.parse(body)
    assert request.guidance_scale > 1.0  # classifier-free guidance on, as the official defaults
    ours = service.pipeline.generate(request, on_frames=lambda _chunk: None)
    assert ours.streamed  # the path that hands frames to the encoder during the decode
    plain = _plain_frames(tiny_checkpoints[layout], request, with_image, service.defaults.flow_shift)
    assert ours.frames.shape == plain.shape == (request.num_frames, request.height, request.width, 3)
    differing = int(np.count_nonzero(ours.frames != plain))
    assert differing == 0, f"{differing} of {plain.size} values differ; max {np.abs(ours.frames.astype(int) - plain).max()}"


def test_a_different_setting_is_seen(services, tiny_checkpoints):
    """The comparison can fail: plain diffusers with another flow shift gives other frames."""
    service = services["ti2v-5b"]
    request = service.parse(dict(BODY))
    ours = service.pipeline.generate(request).frames
    assert not np.array_equal(ours, _plain_frames(tiny_checkpoints["ti2v-5b"], request, False, 3.0))

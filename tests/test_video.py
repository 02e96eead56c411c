"""MP4 encoding round trip: what we write is H.264 yuv420p with the frames and rate asked."""

from __future__ import annotations

import numpy as np
import pytest

from handler.video import decode_frames, encode_mp4, probe_mp4


@pytest.mark.parametrize("frames,width,height,fps", [(1, 128, 128, 24), (33, 256, 160, 16), (9, 704, 128, 24)])
def test_round_trip_keeps_size_frame_count_and_rate(frames, width, height, fps):
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    video = np.stack([np.broadcast_to(((ramp + 8 * i) % 256)[None, :, None], (height, width, 3))
                      for i in range(frames)]).astype(np.uint8)
    data = encode_mp4(video, fps)
    assert data[4:8] == b"ftyp"
    # faststart: the moov atom comes before the media data, so playback can start early.
    assert data.index(b"moov") < data.index(b"mdat")
    info = probe_mp4(data)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert (info.width, info.height, info.num_frames) == (width, height, frames)
    assert info.fps == fps
    decoded = decode_frames(data)
    # Lossy, but close: a smooth ramp survives crf 18 within a few levels on average.
    assert np.abs(decoded.astype(int) - video.astype(int)).mean() < 4


def test_rejects_frames_that_are_not_uint8_rgb():
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((3, 32, 32, 3), dtype=np.float32), 24)
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((3, 32, 32), dtype=np.uint8), 24)


def test_frames_added_in_chunks_give_the_same_mp4_as_all_at_once():
    from handler.video import Mp4Encoder

    frames = np.random.default_rng(3).integers(0, 256, (9, 128, 128, 3), dtype=np.uint8)
    encoder = Mp4Encoder(24)
    for chunk in (frames[:1], frames[1:5], frames[5:]):  # the Wan VAE's 1 + 4 + 4 frames
        encoder.add(chunk)
    assert encoder.finish() == encode_mp4(frames, 24)


def test_an_aborted_encoder_stops_its_thread_and_an_empty_one_says_so():
    from handler.video import Mp4Encoder

    encoder = Mp4Encoder(24)
    encoder.add(np.zeros((4, 128, 128, 3), dtype=np.uint8))
    encoder.abort()
    assert not encoder._thread.is_alive()
    encoder.abort()  # again: harmless
    with pytest.raises(ValueError, match="no frames"):
        Mp4Encoder(24).finish()
    with pytest.raises(ValueError, match="uint8"):
        Mp4Encoder(24).add(np.zeros((2, 8, 8, 3), dtype=np.float32))

"""Decoding video files in-process with PyAV (no ffmpeg subprocess per clip); the `[video]` extra.

- `video_frames`: frames at 1 fps, at the middle of each second (t = 0.5 s, 1.5 s, ..., the OGM-GE
  convention), then K of them evenly spaced and in time order, repeated when the clip has fewer.
- `audio_track`: the video's own sound track, mono float32 at a chosen rate.

Every frame is resized and cropped like a still image (`data_prep.image`): channels-first uint8
[3, size, size].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.image import center_crop_chw, cover_size
from mmlab_cli.extras import require

# at import, so a missing package stops `prepare` in the main process rather than failing every clip
av = require("av", "video", "Decoding video (mmlab prepare crema-d | kinetics-sounds)")


def frames_1fps(path: str | Path, size: int) -> list[np.ndarray]:
    """One resized [3, size, size] frame per second of video, taken at t = 0.5 s, 1.5 s, ...

    A clip shorter than half a second gives its last frame. Memory: one resized frame per second.
    """
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 25)
        start, target, last = None, 0.5, None
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / rate
            start = t if start is None else start
            last = frame
            if t - start >= target - 0.5 / rate:  # the frame nearest each target (a gap repeats it)
                resized = _resized(frame, size)
                while t - start >= target - 0.5 / rate:
                    frames.append(resized)
                    target += 1.0
        if last is None:
            raise ValueError("no decodable video frame")
        if not frames:
            frames.append(_resized(last, size))
    return frames


def _resized(frame: av.VideoFrame, size: int) -> np.ndarray:
    width, height = cover_size(frame.width, frame.height, size)
    rgb = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")  # antialiased
    return center_crop_chw(rgb, size)


def pick_evenly(frames: list[np.ndarray], k: int) -> np.ndarray:
    """K frames evenly spaced over the list, in time order; a shorter list repeats frames. [K, 3, S, S]."""
    index = np.round(np.linspace(0, len(frames) - 1, k)).astype(int)
    return np.stack([frames[i] for i in index])


def video_frames(path: str | Path, k: int, size: int) -> np.ndarray:
    """uint8 [k, 3, size, size]: k of the 1 fps frames, evenly spaced, in time order."""
    return pick_evenly(frames_1fps(path, size), k)


def audio_track(path: str | Path, sample_rate: int) -> np.ndarray:
    """The first audio stream of a video file, mixed to mono, resampled to `sample_rate`, float32."""
    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(container.streams.audio[0]):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if len(wave) == 0:
        raise ValueError("empty audio stream")
    return wave.astype(np.float32, copy=False)

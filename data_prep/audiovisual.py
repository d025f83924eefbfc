"""What CREMA-D and Kinetics-Sounds share: one audio-visual clip -> `audio` spectrogram + `visual` frames.

- audio  [1, F, T] float32, kind "spectrogram": one of `data_prep.audio.AUDIO_RECIPES`, computed from
  a separate wav (CREMA-D's AudioWAV) or from the video's own sound track (Kinetics-Sounds).
- visual [K, 3, S, S] uint8, kind "frames": K of the 1 fps frames, evenly spaced, in time order,
  repeated when the clip is shorter; shorter side resized to S, center crop (`data_prep.video`).
"""

from __future__ import annotations

from data_prep.audio import AUDIO_RECIPES, read_wav, resample
from data_prep.streaming import Clip, reading
from data_prep.video import audio_track, video_frames
from mmlab_cli.data.format import ModalitySpec


def outputs(recipe: str, frames: int, size: int) -> dict[str, ModalitySpec]:
    return {"audio": ModalitySpec(AUDIO_RECIPES[recipe].shape, "float32", "spectrogram"),
            "visual": ModalitySpec((frames, 3, size, size), "uint8", "frames")}


def preprocessing(recipe: str, frames: int, size: int) -> dict:
    """The manifest's description of both recipes."""
    r = AUDIO_RECIPES[recipe]
    return {"audio": {"recipe": r.name, "sample_rate": r.sample_rate, "shape": list(r.shape), "summary": r.summary},
            "visual": {"fps": 1, "sampled_at": "t = 0.5 s, 1.5 s, ... (the middle of each second)",
                       "frames": frames, "selection": "evenly spaced, in time order, repeated when the clip is shorter",
                       "size": size, "resize": f"shorter side to {size}, center crop {size}x{size}",
                       "layout": "[frames, 3, size, size] uint8 RGB"}}


def process_clip(clip: Clip, *, recipe: str, frames: int, size: int) -> dict:
    """The `audio` and `visual` arrays of one clip (audio from files["audio"] when the clip has one,
    else from the video's sound track); a bad file raises a ClipError naming it."""
    r = AUDIO_RECIPES[recipe]
    video = clip.files["video"]
    source = clip.files.get("audio", video)
    with reading(source):
        if source == video:
            wave = audio_track(video, r.sample_rate)
        else:
            wave, sr = read_wav(source)
            wave = resample(wave, sr, r.sample_rate)
        audio = r.compute(wave)
    with reading(video):
        visual = video_frames(video, frames, size)
    return {"audio": audio, "visual": visual}

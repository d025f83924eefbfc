"""Bring your own files: a class-per-folder tree -> prepared dataset, one modality per file type.

Raw layout::

    SRC/<class>/<stem>.<ext>                     test: a seeded stratified 10 %
    SRC/{train,test}/<class>/<stem>.<ext>        the given split (val/ is not read: val is carved;
                                                 a test class folder train lacks is reported)

The files of one sample share a stem inside its class folder; each file type is one modality:

    .wav                                -> audio  [1, F, T] float32 spectrogram (an `AUDIO_RECIPES` recipe, sized
                                           to --seconds at --sample-rate: by default the files' median length
                                           and most common rate; resampling and mono mixdown are reported)
    .png .jpg .jpeg .bmp .webp          -> image  [3, S, S] uint8 (shorter side S, center crop)
    .mp4 .avi .mkv .mov .flv .webm      -> visual [K, 3, S, S] uint8 (1 fps frames, `data_prep.video`)

The modalities are the file types found. A sample lacking one of them, a second file of one type, a
file of another type: listed in prepare_report.json and left out, like a corrupt or truncated file
found while decoding (the streaming machinery of CREMA-D: `data_prep.streaming`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.audio import AUDIO_RECIPES, AudioRecipe, read_wav, resample
from data_prep.image import image_chw
from data_prep.streaming import Clip, Problem, assign_splits, build, reading
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.errors import MmlabError

ROLES = {"audio": (".wav",), "image": (".png", ".jpg", ".jpeg", ".bmp", ".webp"),
         "visual": (".mp4", ".avi", ".mkv", ".mov", ".flv", ".webm")}
ROLE_OF = {ext: role for role, exts in ROLES.items() for ext in exts}
LAYOUT = "SRC/<class>/<stem>.<ext> or SRC/{train,test}/<class>/<stem>.<ext>, ext one of " + " ".join(ROLE_OF)


def scan(src: Path) -> tuple[list[str], list[tuple[str, str, int, dict[str, str]]], list[Problem]]:
    """(classes, samples as (id, given split or "", label, {modality: file}), problems)."""
    split_dirs = (src / "train").is_dir() and (src / "test").is_dir()
    roots = {"train": src / "train", "test": src / "test"} if split_dirs else {"": src}
    class_root = roots["train" if split_dirs else ""]
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if class_root.is_dir() else []
    if not classes:
        raise MmlabError(f"{src}: no class folders; expected {LAYOUT}")
    found, problems = {}, []
    problems += [Problem(str(p), "class folder absent from train/: its files are left out")
                 for p in (sorted(roots["test"].iterdir()) if split_dirs else [])
                 if p.is_dir() and not p.name.startswith(".") and p.name not in classes]
    for split, root in roots.items():
        for label, name in enumerate(classes):
            for path in sorted((root / name).glob("*")) if (root / name).is_dir() else []:
                if path.is_symlink() and not path.exists():
                    problems.append(Problem(str(path), "a broken symlink or a symlink loop: nothing to read"))
                    continue
                if path.name.startswith(".") or not path.is_file():
                    continue
                key = (split, name, path.stem)
                role = ROLE_OF.get(path.suffix.lower())
                if role is None:
                    problems.append(Problem(str(path), f"unknown file type; expected one of {' '.join(ROLE_OF)}"))
                elif role in found.setdefault(key, (label, {}))[1]:
                    problems.append(Problem(str(path), f"a second {role} file for {path.stem} "
                                                       f"(kept {Path(found[key][1][role]).name})", _id(key)))
                else:
                    found[key][1][role] = str(path)
    roles = [r for r in ROLES if any(r in files for _, files in found.values())]
    if not roles:
        raise MmlabError(f"{src}: no file of a known type; expected {LAYOUT}")
    empty = [name for label, name in enumerate(classes) if not any(lab == label for lab, _ in found.values())]
    if empty:
        raise MmlabError(f"{class_root / empty[0]}: an empty class folder (no file of a known type); add its "
                         f"samples or remove the folder")
    samples = []
    for key, (label, files) in found.items():
        lacking = [r for r in roles if r not in files]
        if lacking:
            problems.append(Problem(next(iter(files.values())), f"missing its {', '.join(lacking)} file "
                                                                 f"(no {'/'.join(ROLES[lacking[0]])} with this stem)",
                                    _id(key)))
        elif files:
            samples.append((_id(key), key[0], label, files))
    return classes, samples, problems


def _id(key: tuple[str, str, str]) -> str:
    return "/".join(k for k in key if k)


def outputs(roles: list[str], recipe: AudioRecipe, frames: int, size: int) -> dict[str, ModalitySpec]:
    specs = {"audio": ModalitySpec(recipe.shape, "float32", "spectrogram"),
             "image": ModalitySpec((3, size, size), "uint8", "image"),
             "visual": ModalitySpec((frames, 3, size, size), "uint8", "frames")}
    return {r: specs[r] for r in roles}


def process_clip(clip: Clip, *, recipe: AudioRecipe, frames: int, size: int) -> dict[str, np.ndarray]:
    """The arrays of one sample; a bad file raises a ClipError naming it."""
    arrays = {}
    if "audio" in clip.files:
        r = recipe
        with reading(clip.files["audio"]):
            wave, sr = read_wav(clip.files["audio"])
            arrays["audio"] = r.compute(resample(wave, sr, r.sample_rate))
    if "image" in clip.files:
        with reading(clip.files["image"]):
            arrays["image"] = image_chw(clip.files["image"], size)
    if "visual" in clip.files:
        from data_prep.video import video_frames

        with reading(clip.files["visual"]):
            arrays["visual"] = video_frames(clip.files["visual"], frames, size)
    return arrays


def audio_plan(files: list[str], recipe: AudioRecipe, seconds: float | None,
               sample_rate: int | None) -> tuple[AudioRecipe, dict]:
    """The recipe sized for these wav files and what the report says about them: the rate (--sample-rate, else
    the most common rate of the files, the higher of equals) and length (--seconds, else the median length,
    to 10 ms) every clip becomes, and how many files were resampled (by their rate), mixed down to mono, or
    shorter (tiled or padded) or longer (cut) than that. Unreadable headers are left to the decoding, which
    reports them."""
    infos = []
    for f in files:
        with contextlib.suppress(RuntimeError):
            infos.append(sf.info(f))
    rates = Counter(i.samplerate for i in infos)
    rate = sample_rate or (max(rates, key=lambda r: (rates[r], r)) if rates else recipe.sample_rate)
    lengths = [i.frames / i.samplerate for i in infos]
    length = seconds or (max(round(float(np.median(lengths)), 2), 0.01) if lengths else recipe.seconds)
    sized = recipe.sized(length, rate)
    report = {"recipe": recipe.name, "seconds": length, "sample_rate": rate,
              "chosen": {"seconds": "--seconds" if seconds else "the median length of the files",
                         "sample_rate": "--sample-rate" if sample_rate else "the most common rate of the files"},
              "resampled": {str(r): n for r, n in sorted(rates.items()) if r != rate},
              "mixed_to_mono": sum(i.channels > 1 for i in infos),
              "shorter": sum(x < length - 1e-9 for x in lengths), "longer": sum(x > length + 1e-9 for x in lengths)}
    return sized, report


def prepare_folder(src: str | Path, out: str | Path, *, audio_recipe: str = "ogm-stft", frames: int = 3,
                   size: int = 224, name: str = "", test_fraction: float = 0.1, val_fraction: float = 0.1,
                   seconds: float | None = None, sample_rate: int | None = None, seed: int = 0,
                   workers: int | None = None, force: bool = False) -> tuple[dict, dict, bool]:
    """Prepare the class-per-folder tree at `src` into `out`; returns (manifest, report, built). Audio: every
    clip resampled to `sample_rate`, mixed down to mono and tiled/padded or cut to `seconds` (both chosen from the
    files when not given: `audio_plan`), recorded in the manifest and prepare_report.json."""
    src = Path(src)
    if audio_recipe not in AUDIO_RECIPES:
        raise MmlabError(f"--audio-recipe {audio_recipe!r}: choose one of {', '.join(AUDIO_RECIPES)}")
    if (seconds is not None and not seconds > 0) or (sample_rate is not None and sample_rate < 1000):
        raise MmlabError(f"--seconds {seconds} / --sample-rate {sample_rate}: give a length > 0 s and a rate of at "
                         f"least 1000 Hz")
    classes, samples, problems = scan(src)
    recipe, audio = audio_plan([s[3]["audio"] for s in samples if "audio" in s[3]], AUDIO_RECIPES[audio_recipe],
                               seconds, sample_rate)
    specs = outputs([r for r in ROLES if any(r in s[3] for s in samples)], recipe, frames, size)
    if "visual" in specs:
        import data_prep.video  # noqa: F401 - a missing PyAV is one line now, not one failure per clip

    labels = np.array([s[2] for s in samples], dtype=np.int64)
    given = samples and samples[0][1]
    test = np.array([s[1] == "test" for s in samples]) if given else None
    splits = assign_splits(labels, seed=seed, test=test, test_fraction=test_fraction, val_fraction=val_fraction)
    params = {"modalities": {r: {"extensions": list(ROLES[r])} for r in specs}, "size": size,
              **({"audio": {"recipe": audio_recipe, "summary": recipe.summary, "seconds": recipe.seconds,
                            "sample_rate": recipe.sample_rate, "chosen": audio["chosen"]}}
                 if "audio" in specs else {}),
              **({"frames": frames} if "visual" in specs else {}),
              "split": {"rule": "SRC/train and SRC/test" if given else "stratified by class",
                        "test_fraction": None if given else test_fraction, "val_fraction": val_fraction, "seed": seed}}
    return build(out, dataset=name or src.resolve().name, classes=classes,
                 clips=[Clip(i, str(s), int(y), files) for (i, _, _, files), s, y in zip(samples, splits, labels)],
                 outputs=specs, process=partial(process_clip, recipe=recipe, frames=frames, size=size),
                 preprocessing=params, sources={"src": str(src.resolve()), "layout": LAYOUT}, problems=problems,
                 workers=workers, force=force, report_extra={"audio": audio} if "audio" in specs else None)

"""`mmlab prepare NAME`: raw files -> prepared dataset directory (see mmlab_cli/data/format.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from data_prep.audio import NOISE_COLOURS
from data_prep.synthetic import DEFAULT_INFO
from mmlab_cli.console import cli_errors, console
from mmlab_cli.threads import THREADS, use_threads

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Turn raw files into a prepared dataset directory. "
                  "`mmlab prepare --list` shows every dataset's expected raw layout; "
                  "`mmlab prepare NAME --help` documents its parameters and output shapes.")

@app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context,
             list_: bool = typer.Option(False, "--list", help="Show every dataset with its expected raw layout.")) -> None:
    if list_:
        _list_datasets()
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _list_datasets() -> None:
    """Each command's first help line and its `Raw layout:` block: the help text is the one source."""
    console.print("[bold]mmlab prepare NAME[/bold]: the datasets and the raw files each expects\n")
    for command in app.registered_commands:
        doc = (command.callback.__doc__ or "").strip()
        console.print(f"[bold]{command.name}[/bold]  {doc.splitlines()[0] if doc else ''}", highlight=False)
        for line in _raw_layout(doc).splitlines():
            console.print(f"    {line}", markup=False, highlight=False)
        console.print()


def _raw_layout(doc: str) -> str:
    """The block of lines after `Raw layout:` in a help text."""
    lines = [line.strip() for line in doc.splitlines()]
    if "Raw layout:" not in lines:
        return ""
    block = []
    for line in lines[lines.index("Raw layout:") + 1:]:
        if line:
            block.append(line)
        elif block:
            break
    return "\n".join(block)


def _summary(manifest: dict, out: Path, built: bool) -> None:
    """Samples per class (rows) and split (columns), then the modalities' shapes."""
    from rich.table import Table

    splits = manifest["splits"]
    table = Table(title=f"{manifest['dataset']} -> {out}" + ("" if built else " (already prepared; --force rebuilds)"))
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for c, name in enumerate(manifest["classes"]):
        table.add_row(name, *(str(s["class_counts"][c]) for s in splits.values()))
    table.add_row("[bold]total", *(f"[bold]{s['count']}" for s in splits.values()))
    console.print(table)
    shapes = ", ".join(f"{m} {tuple(s['shape'])} {s['dtype']} ({s['kind']})" for m, s in manifest["modalities"].items())
    console.print(f"modalities: {shapes}")


@app.command("synthetic")
@cli_errors
def synthetic(
    out: Path = typer.Option(Path("data/synthetic"), help="Output directory."),
    image_info: float = typer.Option(DEFAULT_INFO["image"], help="Informativeness of the image modality (class signal / noise)."),
    audio_info: float = typer.Option(DEFAULT_INFO["audio"], help="Informativeness of the audio modality."),
    third: bool = typer.Option(False, "--third", help="Add a third modality `depth` (1x16x16 image)."),
    depth_info: float = typer.Option(DEFAULT_INFO["depth"], help="Informativeness of the third modality."),
    classes: int = typer.Option(10, min=2, help="Number of classes."),
    train_size: int = typer.Option(3000, min=20, help="Training samples before the 10 % validation split."),
    test_size: int = typer.Option(1000, min=10, help="Test samples."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same bytes."),
    coupling: float = typer.Option(0.0, min=0.0, max=1.0, metavar="RHO", help="Share rho of each modality's "
                                   "sample-specific noise carried by a latent u ~ N(0, I_8) that the sample's "
                                   "modalities share beyond the class: noise_m = sqrt(rho) S_m u + sqrt(1 - rho) "
                                   "eps_m, S_m u unit-variance (8 fixed patterns of the modality), eps_m its own; "
                                   "the two modalities' components then covary as rho S_a S_b^T. 0: independent "
                                   "given the class (the same bytes as without it), class-level pairs; > 0: "
                                   "sample-level pairs (docs/prepare.md)."),
    threads: int = THREADS,
    force: bool = typer.Option(False, help="Rebuild from scratch, replacing the dataset OUT holds (without it, "
                               "OUT prepared with other parameters is an error)."),
) -> None:
    """The embedded default: a class-conditional synthetic dataset, no download.

    Raw layout:

        none: generated from the seed

    image [1,28,28] float in [0,1]; audio [1,33,33] log spectrogram (8 kHz, n_fft 64, hop 125);
    depth [1,16,16] with --third. Modalities are independent given the class, unless --coupling gives
    each sample a latent its modalities share (sample-level pairs).
    """
    from data_prep.synthetic import prepare_synthetic

    with use_threads(threads):
        manifest, built = prepare_synthetic(out, num_classes=classes, train_size=train_size, test_size=test_size,
                                            image_info=image_info, audio_info=audio_info, third=third,
                                            depth_info=depth_info, seed=seed, coupling=coupling, force=force)
    _summary(manifest, out, built)


@app.command("avmnist")
@cli_errors
def avmnist(
    mnist: Path = typer.Option(..., help="Folder with MNIST IDX files (t10k-*; train-* too for the 70,000-image version)."),
    fsdd: Path = typer.Option(..., help="FSDD folder: `recordings/` of {digit}_{speaker}_{index}.wav, or that folder itself."),
    out: Path = typer.Option(Path("data/avmnist"), help="Output directory."),
    pca_keep: float = typer.Option(0.25, min=0.0, max=1.0, help="Fraction of PCA energy kept in the images "
                                   "(0.25 = remove 75 %, the original AVMNIST)."),
    noise: Optional[str] = typer.Option(None, help=f"Add noise to the audio: {' or '.join(NOISE_COLOURS)} (pink: "
                                        "power ~ 1/f), at --snr-db over the whole zero-padded 1 s window "
                                        "(AVMNIST-like: the original mixes in ESC-50 noise, not obtainable here)."),
    snr_db: Optional[float] = typer.Option(None, help="Signal-to-noise ratio of the added noise in dB (alone: "
                                           "white noise)."),
    speaker_split: bool = typer.Option(False, "--speaker-split", help="Hold out whole FSDD speakers (seeded: one "
                                       "for test, one for val, the rest train) instead of splitting by take index."),
    test_fraction: float = typer.Option(0.2, help="Test fraction when only the 10,000 MNIST test images exist."),
    seed: int = typer.Option(0, help="Seed for splits, pairing, held-out speakers and noise."),
    threads: int = THREADS,
    force: bool = typer.Option(False, help="Rebuild from scratch, replacing the dataset OUT holds (without it, "
                               "OUT prepared with other parameters is an error)."),
) -> None:
    """AVMNIST from MNIST IDX files and FSDD recordings.

    Raw layout:

        --mnist DIR: t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (train-* optional)
        --fsdd DIR: recordings/{digit}_{speaker}_{index}.wav

    image [1,28,28] float32: MNIST reconstructed from its top principal components;
    audio [1,112,112] float32: log(|STFT|+1e-7) of an FSDD take of the same digit.
    Pairs are class-level (an image and a recording share only the digit).
    Unreadable or truncated recordings are listed in OUT/prepare_report.json and left out.
    """
    from data_prep.avmnist import prepare_avmnist

    with use_threads(threads):
        manifest, report, built = prepare_avmnist(mnist, fsdd, out, pca_keep=pca_keep, noise=noise, snr_db=snr_db,
                                                  speaker_split=speaker_split, test_fraction=test_fraction,
                                                  seed=seed, force=force)
    _summary(manifest, out, built)
    if "speakers" in manifest:  # a dataset prepared before it was recorded lacks it
        console.print("FSDD speakers: " + "; ".join(f"{split} {', '.join(names)}"
                                                   for split, names in manifest["speakers"].items()))
    _left_out(report, out)


# ----- the real benchmarks: options shared by the three commands
SRC = typer.Option(..., "--src", help="Folder with the raw files, in the layout shown above.")
WORKERS = typer.Option(None, min=1, help="Worker processes, one thread each (default: the CPUs this process may use: "
                       "affinity, SLURM_CPUS_PER_TASK).")
SEED = typer.Option(0, help="Seed of the held-out splits.")
FORCE = typer.Option(False, "--force", help="Rebuild from scratch, even if OUT is finished or half-done (without "
                     "it, OUT prepared with other parameters is an error).")
NAME = typer.Option("", help="Dataset name in the manifest (default: the SRC folder's name).")
FRAMES = typer.Option(3, min=1, help="Frames K kept per clip (evenly spaced, time order, repeated when fewer).")
FRAME_SIZE = typer.Option(224, min=8, help="Frame side S: shorter side resized to S, then center crop S x S.")


def _prepare(fn, out: Path, **kwargs) -> None:
    """Run a streaming prepare function, then print the per-split/per-class table and what was left out."""
    try:
        manifest, report, built = fn(out=out, **kwargs)
    except KeyboardInterrupt:
        console.print(f"interrupted: finished clips are kept in {out}; run the same command again to resume")
        raise typer.Exit(130) from None
    _summary(manifest, out, built)
    _left_out(report, out)
    if "audio" in report:  # prepare folder: what the audio became
        a = report["audio"]
        resampled = ", ".join(f"{n} from {r} Hz" for r, n in a["resampled"].items()) or "none"
        console.print(f"audio: {a['seconds']:g} s at {a['sample_rate']} Hz ({a['chosen']['seconds']}; "
                      f"{a['chosen']['sample_rate']}); resampled: {resampled}; mixed down to mono: "
                      f"{a['mixed_to_mono']}; shorter (tiled or padded): {a['shorter']}; longer (cut): {a['longer']}")


def _left_out(report: dict, out: Path, shown: int = 10) -> None:
    """Count what was left out, show the first few, point at the full list."""
    left = report["left_out"]
    console.print(f"prepared {report['prepared']} clips in {report['seconds']} s; left out {len(left)}: "
                  f"{report['left_out_while_scanning']} found while scanning (missing partner, bad name, unlisted), "
                  f"{report['failed_while_processing']} unreadable" + (f"; all listed in {out / 'prepare_report.json'}"
                                                                        if left else ""))
    for p in left[:shown]:
        console.print(f"  {p['path']}: {p['reason']}", markup=False, highlight=False)
    if len(left) > shown:
        console.print(f"  ... and {len(left) - shown} more")


@app.command("crema-d")
@cli_errors
def crema_d(
    src: Path = SRC,
    out: Path = typer.Option(Path("data/crema-d"), help="Output directory."),
    audio_recipe: str = typer.Option("ogm-stft", help="Audio recipe (only ogm-stft; see above)."),
    frames: int = FRAMES,
    frame_size: int = FRAME_SIZE,
    label_order: str = typer.Option("ogm", help="ogm: NEU HAP SAD FEA DIS ANG (OGM-GE); sorted: ANG DIS FEA HAP NEU SAD."),
    split_file: Optional[Path] = typer.Option(None, help="OGM-GE split: folder with train.csv and test.csv "
                                              "(`clip,EMO` lines), or either file; without train.csv the rest is train."),
    speaker_disjoint: bool = typer.Option(False, "--speaker-disjoint", help="Hold out whole actors (10 %) instead of "
                                          "clips; val too."),
    seed: int = SEED,
    workers: Optional[int] = WORKERS,
    force: bool = FORCE,
) -> None:
    """CREMA-D: 7,442 clips of 91 actors, 6 emotions, audio + face video.

    Raw layout:

      SRC/AudioWAV/{actor}_{sentence}_{EMO}_{level}.wav  (1001_DFA_ANG_XX.wav)
      SRC/VideoFlash/{actor}_{sentence}_{EMO}_{level}.flv

    Output: OUT/{train,val,test}/, manifest.json, prepare_report.json.

      audio   [1, 257, 188] float32, recipe ogm-stft (DML paper B.1):
              resample to 22,050 Hz, tile or cut to 3 s, clip to [-1, 1],
              log(|STFT| + 1e-7), Hann window, n_fft 512, hop 353
      visual  [K, 3, S, S] uint8: frames at 1 fps (t = 0.5 s, 1.5 s, ...)
              of the .flv, K evenly spaced in time order (repeated when
              fewer), shorter side resized to S, center crop
      labels  int64: emotion index, class order in manifest.json

    Splits: --split-file for the published OGM-GE split; else a seeded
    stratified 90/10 clip split, or actor-disjoint with --speaker-disjoint.
    Val: 10 % of train. Corrupt, truncated or missing files are listed in
    prepare_report.json and left out. A re-run resumes, or does nothing
    when OUT is finished.
    """
    from data_prep.crema_d import prepare_crema_d

    _prepare(prepare_crema_d, out, src=src, audio_recipe=_recipe(audio_recipe, ("ogm-stft",)), frames=frames,
             frame_size=frame_size, label_order=label_order, split_file=split_file,
             speaker_disjoint=speaker_disjoint, seed=seed, workers=workers, force=force)


@app.command("kinetics-sounds")
@cli_errors
def kinetics_sounds(
    src: Path = SRC,
    out: Path = typer.Option(Path("data/kinetics-sounds"), help="Output directory."),
    list_file: Optional[Path] = typer.Option(None, "--list", help="CSV of path,label[,split] (paths relative to SRC, "
                                             "label a class name or index) instead of class folders."),
    audio_recipe: str = typer.Option("kaldi-fbank", help="kaldi-fbank or mel128 (see above)."),
    frames: int = FRAMES,
    frame_size: int = FRAME_SIZE,
    seed: int = SEED,
    workers: Optional[int] = WORKERS,
    force: bool = FORCE,
) -> None:
    """Kinetics-Sounds: 31 sounding action classes of Kinetics (OGM-GE), audio + video.

    Raw layout:

      SRC/train/<class>/<video>.mp4 and SRC/test/<class>/<video>.mp4
      (test may be named val), or SRC/<class>/<video>.mp4 (test: a seeded
      stratified 10 %), or --list FILE of path,label[,split] lines

    <class>: one of the names below (`_` for spaces accepted); other folders
    are skipped, so a Kinetics-400 tree works. Audio: the video's own track.

    Output: OUT/{train,val,test}/, manifest.json, prepare_report.json.

      audio   kaldi-fbank: [1, 1024, 128] float32, the AST recipe: 16 kHz,
              Kaldi fbank 128 mel bins, 25 ms window, 10 ms shift, padded
              or cut to 1024 frames, (x + 4.2677) / (2 * 4.5690)
              mel128: [1, 128, 128] float32 (DML paper B.1): 16 kHz, 10 s
              tiled or cut, log(mel power + 1e-7), n_fft 2048, hop 1250
      visual  [K, 3, S, S] uint8: 1 fps frames (t = 0.5 s, 1.5 s, ...), K
              evenly spaced in time order, shorter side S, center crop
      labels  int64: index in the class list

    Classes, in label order: bowling, ripping paper, playing xylophone,
    playing organ, playing bass guitar, tapping guitar, playing accordion,
    playing guitar, dribbling basketball, playing piano, playing bagpipes,
    playing saxophone, playing harmonica, tickling, blowing nose, tapping
    pen, chopping wood, blowing out candles, tap dancing, stomping grapes,
    playing clarinet, laughing, playing trombone, shoveling snow, playing
    trumpet, playing violin, singing, shuffling cards, playing keyboard,
    mowing lawn, playing drums. Val: 10 % of train, stratified.
    """
    from data_prep.kinetics_sounds import prepare_kinetics_sounds

    _prepare(prepare_kinetics_sounds, out, src=src, list_file=list_file,
             audio_recipe=_recipe(audio_recipe, ("kaldi-fbank", "mel128")), frames=frames, frame_size=frame_size,
             seed=seed, workers=workers, force=force)


@app.command("food101")
@cli_errors
def food101(
    src: Path = SRC,
    out: Path = typer.Option(Path("data/food101"), help="Output directory."),
    tokenizer: Path = typer.Option(..., help="Local directory of a `transformers` tokenizer (e.g. a saved "
                                   "bert-base-uncased); nothing is downloaded."),
    max_length: int = typer.Option(40, min=2, help="Tokens per text L (padded or truncated, special tokens included)."),
    image_size: int = typer.Option(224, min=8, help="Image side S: shorter side resized to S, then center crop."),
    seed: int = SEED,
    workers: Optional[int] = WORKERS,
    force: bool = FORCE,
) -> None:
    """UPMC-Food101: about 100,000 recipe pages of 101 dishes, image + title.

    Raw layout:

      SRC/images/{train,test}/<class>/<image>.jpg
      SRC/texts/{train,test}_titles.csv  (rows image,text,class; a header
      row image,text,label also works)

    Output: OUT/{train,val,test}/, manifest.json, prepare_report.json.

      image   [3, S, S] uint8: shorter side resized to S (224), center crop
      text    [2, L] int64: row 0 token ids, row 1 attention mask, from the
              --tokenizer directory, padded or truncated to L (40)
      labels  int64: class index, alphabetical order of images/train/

    Val: 10 % of train, stratified. Missing or unreadable images are listed
    in prepare_report.json and left out.
    """
    from data_prep.food101 import prepare_food101

    _prepare(prepare_food101, out, src=src, tokenizer=tokenizer, max_length=max_length, image_size=image_size,
             seed=seed, workers=workers, force=force)


@app.command("features")
@cli_errors
def features(
    src: Path = SRC,
    out: Path = typer.Option(Path("data/features"), help="Output directory."),
    name: str = NAME,
    val_fraction: float = typer.Option(0.1, min=0.01, max=0.5, help="Fraction of train carved as val when SRC has "
                                       "no val/ (seeded, stratified)."),
    seed: int = SEED,
    pairing: Optional[str] = typer.Option(None, metavar="sample-level|class-level", help="What row i of two "
                                          "modalities shares: one sample seen twice (sample-level) or only a class "
                                          "(class-level); recorded in the manifest, where geometry reads it."),
    force: bool = FORCE,
) -> None:
    """Your own precomputed features (MultiBench style): arrays per split and modality.

    Raw layout:

      SRC/{train,test}/labels.npy (int class indices), optional SRC/val/
      SRC/{split}/{modality}.npy   [N, ...] fixed-size features
      SRC/{split}/{modality}.npz   x [N, T, D] + lengths [N] or mask [N, T]
      SRC/classes.txt              optional, one class name per line
      or SRC a .yaml naming the files: train: {labels: y.npy, audio: a.npy}

    Output: a .npy modality as is (kind features); a .npz one as [N, T, 1 + D]
    float32, channel 0 the mask (kind sequence). Checked first, each a one-line
    error naming the file: readable, rows = labels, shapes alike across splits,
    finite values, every class in every split. Val: SRC/val, or a seeded
    stratified --val-fraction of train.
    """
    from data_prep.features import prepare_features

    manifest, built = prepare_features(src, out, name=name, val_fraction=val_fraction, seed=seed, pairing=pairing,
                                       force=force)
    _summary(manifest, out, built)


@app.command("folder")
@cli_errors
def folder(
    src: Path = SRC,
    out: Path = typer.Option(Path("data/folder"), help="Output directory."),
    name: str = NAME,
    audio_recipe: str = typer.Option("ogm-stft", help="Spectrogram recipe of .wav files: ogm-stft, kaldi-fbank or "
                                     "mel128 (see crema-d and kinetics-sounds)."),
    frames: int = FRAMES,
    size: int = typer.Option(224, min=8, help="Image and frame side S: shorter side resized to S, center crop."),
    seconds: Optional[float] = typer.Option(None, help="Audio clip length: shorter clips tiled (kaldi-fbank: "
                                            "padded), longer ones cut [default: the files' median length]."),
    sample_rate: Optional[int] = typer.Option(None, help="Audio rate every .wav is resampled to before its "
                                              "spectrogram [default: the files' most common rate]."),
    seed: int = SEED,
    workers: Optional[int] = WORKERS,
    force: bool = FORCE,
) -> None:
    """Your own files, one folder per class; files of a sample share a stem.

    Raw layout:

      SRC/<class>/<stem>.<ext>  (test: a seeded stratified 10 %)
      or SRC/{train,test}/<class>/<stem>.<ext>

    One modality per file type found: .wav -> audio [1, F, T] float32
    (--audio-recipe at --sample-rate, --seconds long; resampled and stereo
    files counted in prepare_report.json); .png .jpg .jpeg .bmp .webp ->
    image [3, S, S] uint8;
    .mp4 .avi .mkv .mov .flv .webm -> visual [K, 3, S, S] uint8 (1 fps frames).
    A sample lacking a file type, a corrupt or truncated file: listed in
    prepare_report.json and left out. Val: 10 % of train, stratified.
    """
    from data_prep.folder import prepare_folder

    _prepare(prepare_folder, out, src=src, name=name, audio_recipe=audio_recipe, frames=frames, size=size,
             seconds=seconds, sample_rate=sample_rate, seed=seed, workers=workers, force=force)


@app.command("ur-funny")
@cli_errors
def ur_funny(
    src: Path = SRC,
    out: Path = typer.Option(Path("data/ur-funny"), help="Output directory."),
    max_length: int = typer.Option(50, min=1, help="Words L per sample: the last L kept, padded at the end."),
    context: bool = typer.Option(True, help="Context sentences before the punchline (--no-context: punchline only)."),
    force: bool = FORCE,
) -> None:
    """UR-FUNNY: humor in TED talks, text + acoustic + visual word-aligned features.

    Raw layout:

      SRC/data_folds.pkl, language_sdk.pkl (V1: word_embedding_indexes_sdk.pkl),
      word_embedding_list.pkl, covarep_features_sdk.pkl,
      openface_features_sdk.pkl, humor_label_sdk.pkl  (the official release)

    Output (kind sequence, channel 0 the mask, one step per word: context
    words then punchline words, the last L kept):

      text      [L, 301] float32: GloVe vectors of word_embedding_list
      acoustic  [L, 82] float32: COVAREP
      visual    [L, 372] float32: OpenFace2
      labels    int64: 0 not humorous, 1 humorous

    Splits: the official folds (dev -> val). A segment missing from a pickle is
    listed in prepare_report.json and left out.
    """
    from data_prep.ur_funny import prepare_ur_funny

    _prepare(prepare_ur_funny, out, src=src, max_length=max_length, context=context, force=force)


def _recipe(name: str, allowed: tuple[str, ...]) -> str:
    from mmlab_cli.errors import MmlabError

    if name not in allowed:
        raise MmlabError(f"--audio-recipe {name!r}: this dataset offers {', '.join(allowed)}")
    return name

"""Throughput of `mmlab prepare crema-d` against a per-file loop in the style of the published pipelines.

    python benchmarks/prepare_throughput.py [--clips 240] [--workdir DIR]

Builds a CREMA-D release of `--clips` clips (a few espeak-ng utterances resampled by sox to
16 kHz, a few 480x360 30 fps .flv made by ffmpeg like the real VideoFlash files, hard-linked
under every clip name), then, in the same run on the same machine:

- baseline: one Python process, file by file, as the OGM-GE / BalanceBenchmark scripts do it:
  load the wav, resample to 22,050 Hz, tile to 3 s, STFT (n_fft 512, hop 353), log, one pickle per
  clip; one `ffmpeg -vf fps=1` subprocess per video writing one JPEG per frame. librosa is not
  installed here, so the loop uses soundfile + scipy.signal.resample_poly + a numpy STFT written
  the way librosa.stft computes it (centred frames, Hann window, rfft);
- mmlab: `mmlab prepare crema-d` (the Typer command, default settings, every core), and again on
  4x the clips to show that its peak memory does not grow with the dataset.

Each runs in a fresh subprocess; the parent samples /proc every 100 ms for the peak of the summed
PSS of the whole process tree (shared pages counted once) and the largest single RSS.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
SENTENCES = ("DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI")
UTTERANCES = ("Don't forget a jacket.", "It's eleven o'clock.", "I'm on my way to the meeting.",
              "I think I have a doctor's appointment.", "That is exactly what happened.", "The airplane is almost full.")


# ----- the fixture
def make_release(root: Path, clips: int) -> None:
    """SRC/AudioWAV + SRC/VideoFlash with `clips` names, hard links to a few real encoded files."""
    for tool in ("espeak-ng", "sox", "ffmpeg"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool} on PATH (apt-get install espeak-ng sox ffmpeg)")
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    wavs, flvs = [], []
    for k, text in enumerate(UTTERANCES):
        wav = sources / f"{k}.wav"
        if not wav.exists():
            spoken = subprocess.run(["espeak-ng", "--stdout", "-s", str(140 + 10 * k), text], check=True,
                                    capture_output=True).stdout
            subprocess.run(["sox", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", str(wav)], input=spoken,
                           check=True, capture_output=True)
        wavs.append(wav)
    for k, seconds in enumerate((2.2, 2.6, 3.1)):
        flv = sources / f"{k}.flv"
        if not flv.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc2=s=480x360:r=30:d={seconds}", "-c:v", "flv1", "-q:v", "4", str(flv)], check=True)
        flvs.append(flv)
    release = root / f"crema-{clips}"
    if release.exists():
        return
    for d in ("AudioWAV", "VideoFlash"):
        (release / d).mkdir(parents=True)
    for i in range(clips):
        name = f"{1001 + i // 72}_{SENTENCES[i // 6 % 12]}_{EMOTIONS[i % 6]}_XX"
        os.link(wavs[i % len(wavs)], release / "AudioWAV" / f"{name}.wav")
        os.link(flvs[i % len(flvs)], release / "VideoFlash" / f"{name}.flv")


# ----- the baseline loop (run in its own process)
def baseline(src: Path, out: Path) -> None:
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    window = np.hanning(513)[:-1]  # periodic Hann, as librosa's get_window("hann", 512)
    (out / "audio").mkdir(parents=True)
    for wav in sorted((src / "AudioWAV").glob("*.wav")):
        samples, rate = sf.read(str(wav), dtype="float32")  # librosa.load(sr=22050): read + resample
        samples = resample_poly(samples, 22050 // 50, rate // 50).astype(np.float32)
        resamples = np.clip(np.tile(samples, 3)[:22050 * 3], -1.0, 1.0)
        padded = np.pad(resamples, 256)  # librosa.stft(n_fft=512, hop_length=353, center=True)
        frames = np.lib.stride_tricks.sliding_window_view(padded, 512)[::353]
        spectrogram = np.log(np.abs(np.fft.rfft(frames * window, axis=1)).T + 1e-7)
        with open(out / "audio" / f"{wav.stem}.pkl", "wb") as f:
            pickle.dump(spectrogram, f)
        frame_dir = out / "visual" / wav.stem
        frame_dir.mkdir(parents=True)
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(src / "VideoFlash" / f"{wav.stem}.flv"), "-vf", "fps=1",
                        "-q:v", "2", str(frame_dir / "frame_%05d.jpg")], check=True)


def mmlab(src: Path, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from mmlab_cli.commands.prepare import app

    app(["crema-d", "--src", str(src), "--out", str(out)], standalone_mode=False)


# ----- measuring
def tree_memory(pid: int) -> tuple[int, int]:
    """(summed PSS, largest RSS) in bytes over `pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith(" "))
            pss += int(fields["Pss"].split()[0]) * 1024
            rss = max(rss, int(fields["Rss"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            pass
    return pss, rss


def measure(mode: str, src: Path, out: Path) -> tuple[float, int, int]:
    """(seconds, peak summed PSS, peak single RSS) of one mode, run in a fresh subprocess."""
    shutil.rmtree(out, ignore_errors=True)
    log = out.with_name(f"{out.name}.log")
    started = time.time()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, __file__, "--run", mode, str(src), str(out)], cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    seconds = time.time() - started
    sampler.join()
    if code:
        sys.exit(f"{mode} failed with exit code {code}:\n{log.read_text()[-3000:]}")
    return seconds, peak[0], peak[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=240, help="clips in the generated release (>= 200)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmlab-bench-"))
    print(f"building CREMA-D fixtures of {args.clips} and {4 * args.clips} clips in {work} ...", flush=True)
    make_release(work, args.clips)
    make_release(work, 4 * args.clips)
    rows = []
    for label, mode, clips in (("baseline: 1 process, per-file loop", "baseline", args.clips),
                               (f"mmlab prepare crema-d ({len(os.sched_getaffinity(0))} workers)", "mmlab", args.clips),
                               (f"mmlab prepare crema-d, {4 * args.clips} clips", "mmlab", 4 * args.clips)):
        seconds, pss, rss = measure(mode, work / f"crema-{clips}", work / f"out-{mode}-{clips}")
        rows.append((label, clips, seconds, clips / seconds, pss, rss))
        print(f"  {label}: {clips} clips in {seconds:.1f} s", flush=True)
    print(f"\n{'pipeline':44} {'clips':>6} {'seconds':>8} {'clips/s':>8} {'peak PSS':>10} {'peak RSS':>10}")
    for label, clips, seconds, rate, pss, rss in rows:
        print(f"{label:44} {clips:6d} {seconds:8.1f} {rate:8.1f} {pss / 2**20:8.0f} MB {rss / 2**20:7.0f} MB")
    print(f"\nthroughput ratio mmlab / baseline ({args.clips} clips): {rows[1][3] / rows[0][3]:.2f}")
    print("(seconds include interpreter start and imports; peak PSS sums the process tree, shared pages once;"
          " peak RSS is the largest single process)")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--run":
        {"baseline": baseline, "mmlab": mmlab}[sys.argv[2]](Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()

"""Copy one example of every figure type from analysed demo runs into docs/figures/ and write
docs/figures.md. `make gallery` trains the runs, analyses them and then runs this:
    python docs/gallery.py RUNS_DIR
so anyone can regenerate the gallery after a change and compare it with the committed one."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# (figure under RUNS_DIR, what it shows); the order of docs/figures.md
GALLERY = (
    ("report_accuracy.png", "`mmlab report`: test accuracy per method, fused bar and hatched probe bars, error bars "
     "± one std over seeds, the unimodal runs as dashed reference lines."),
    ("report_learning.png", "`mmlab report`: learning curves, validation accuracy (fused solid, each modality's probe by "
     "line style) and train/validation loss, mean ± standard error over seeds, one colour per method."),
    ("report_coefficients.png", "`mmlab report`: what the methods recorded per epoch (here OGM-GE's coefficient k per "
     "modality), one panel per term."),
    ("report_sharpness.png", "`mmlab report`: λ_max per epoch of runs trained with --track-sharpness (mean ± standard "
     "error over seeds, log scale), each method's stability limit 2(1+β)/η dotted."),
    ("report_gap.png", "`mmlab report`: the modality gap W2² of the unit embeddings per method, ± one std over seeds, "
     "with its same-law floor (two halves of one modality) as a black tick."),
    ("report_eps.png", "`mmlab report`: accuracy against the PGD radius ε per method, mean ± standard error over "
     "seeds (the ε50 table's figure), one panel per attacked modality."),
    ("compare/flatness/flatness_comparison_landscape_2d_contour.png",
     "2-D loss landscape, SML vs DML (the DML paper's Figure 1): shared log-spaced levels, one colour bar."),
    ("compare/flatness/flatness_comparison_landscape_2d_surface.png",
     "The same landscapes as surfaces, one z range and one colour bar."),
    ("compare/flatness/flatness_comparison_landscape_1d.png",
     "1-D loss landscape along one filter-normalised direction."),
    ("compare/flatness/flatness_comparison_fgap.png",
     "F_gap on relative radii, train and test panels (the DML paper's Figure 4)."),
    ("compare/flatness/flatness_comparison_density.png",
     "Hessian eigenvalue density (SLQ): one smoothing width on one grid for every run, no floor."),
    ("sml/flatness_fgap.png", "F_gap of a single run (in the run directory)."),
    ("compare/robustness/comparison_image.png",
     "Corrupting the image: accuracy against each corruption's physical parameter, chance level dotted."),
    ("compare/robustness/comparison_audio.png",
     "Corrupting the audio: SNR in dB (clean on the left), masked fractions, σ in train stds."),
    ("compare/robustness/comparison_pgd.png", "PGD on one modality at the run's ε: accuracy clean and under attack."),
    ("compare/robustness/comparison_pgd_eps.png", "PGD on one modality: accuracy against ε (pixels for the image, "
     "multiples of the input's std for the audio; symmetric-log axis), each run's half-clean level dashed: ε50 is "
     "where its line crosses it."),
    ("sml/robustness_image.png", "Corruption curves of a single run (in the run directory)."),
    ("compare/geometry/geometry_comparison_tsne.png",
     "t-SNE of SML and DML side by side on one class colour code (the DML paper's Figure 5)."),
    ("sml/geometry_tsne.png", "t-SNE of a single run, titled by its method."),
    ("sml/geometry_cosine.png", "Positive (paired) vs negative (mismatched) cross-modal cosines, in greys (colours "
     "mean methods)."),
    ("sml/geometry_spectrum.png", "Covariance spectrum of the unit embeddings per modality."),
)


def main(runs: Path) -> None:
    out = DOCS / "figures"
    out.mkdir(exist_ok=True)
    index = DOCS / "figures.md"
    for old in re.findall(r"\]\(figures/([^)]+\.png)\)", index.read_text() if index.is_file() else ""):
        (out / old).unlink(missing_ok=True)  # the previous gallery's; docs/results/ keeps its own figures here
    lines = ["# Figures", "",
             "One example of every figure mmlab draws, from the demo runs (synthetic dataset, tiny CNNs, a few "
             "epochs, small analysis settings: the numbers mean nothing, the layout is the point). Regenerate with "
             "`make gallery` and compare after changing a plot. Style, sizes and the colour of each method: "
             "`mmlab_cli/figures.py`; `--figure-format png,pdf` adds vector files.", ""]
    for source, caption in GALLERY:
        name = Path(source).name if source.startswith("compare/") or "/" not in source else f"run_{Path(source).name}"
        shutil.copyfile(runs / source, out / name)
        lines += [f"## `RUNS/{source}`", "", caption, "", f"![{caption}](figures/{name})", ""]
    (DOCS / "figures.md").write_text("\n".join(lines))
    print(f"wrote {len(GALLERY)} figures to {out} and {DOCS / 'figures.md'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

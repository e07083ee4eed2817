"""Multi-image consistency: are single-photo identities of one person closer than those of different people?

    python -m eval.consistency [--lfw DIR] [--people 20] [--seed 0] [--modes fit,rnet,rnet+fit] [--cfp]
        [--models-dir DIR]

On the LFW part of the training pool (``shared/data/faces-train/lfw``, files ``<Name>_<NNNN>.jpg``), among the
held-out people that no shipped network trained on (``facerecon.train.data.is_validation_person``): ``--people``
people with 2-4 photos each (drawn with ``--seed``), every photo reconstructed **on its own** (largest face).
Then, over all pairs of photos, the distance between their identities:

* ``id L2``: Euclidean distance between the identity coefficient vectors;
* ``id cos``: cosine distance (1 - cos) between them;
* ``shape mm``: RMS distance (mm) between the two neutral identity shapes (mean + identity offsets, zero
  expression, model frame, so no alignment is needed) over the face region (``face_mask``).

With ``--cfp``, the same over CFP's held-out people (``shared/data/faces-train/cfp``, ``<id>/frontal|profile``): two
frontal and two profile photos per person, and only **frontal-vs-profile** pairs count (same person's frontal and
profile = genuine, one person's frontal and another's profile = impostor): does the identity survive a 90-degree
turn?

Genuine pairs (same person) vs impostor pairs (different people): mean, sd and quartiles of each, the AUC
(probability that a random impostor pair is farther apart than a random genuine pair; 0.5 = identity carries no
information about the person, 1 = perfect) and d' = (mean_imp - mean_gen) / sqrt((sd_gen^2 + sd_imp^2) / 2).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from facerecon.errors import FaceReconError
from facerecon.imaging import load_image
from facerecon.pipeline import Reconstructor
from facerecon.train.data import is_validation_person

DEFAULT_LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces-train" / "lfw"
MM_PER_MODEL_UNIT = 100.0  # decimetres -> millimetres


def people_with_sets(folder: Path, n: int, seed: int, lo: int = 2, hi: int = 4) -> dict[str, list[Path]]:
    by_person: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(folder.glob("*.jpg")):
        by_person[p.stem.rsplit("_", 1)[0]].append(p)
    # only the held-out people (facerecon.train.data.is_validation_person): no shipped network trained on them
    names = sorted(k for k, v in by_person.items() if lo <= len(v) <= hi and is_validation_person(k))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(names, size=min(n, len(names)), replace=False).tolist())
    return {k: by_person[k] for k in chosen}


DEFAULT_CFP = DEFAULT_LFW.parent / "cfp"


def cfp_people(folder: Path, n: int, seed: int, per_view: int = 2) -> dict[str, list[Path]]:
    """``n`` held-out CFP people (seeded) -> ``per_view`` frontal then ``per_view`` profile photos each."""
    root = folder / "images"
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and is_validation_person(f"cfp{d.name}"))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(names, size=min(n, len(names)), replace=False).tolist())
    return {f"cfp{k}": [*sorted((root / k / "frontal").glob("*.jpg"))[:per_view],
                        *sorted((root / k / "profile").glob("*.jpg"))[:per_view]] for k in chosen}


def auc(genuine: list[float], impostor: list[float]) -> float:
    """P(impostor > genuine), ties counted half (Mann-Whitney U / (n_g n_i))."""
    g = np.asarray(genuine)[:, None]
    i = np.asarray(impostor)[None, :]
    return float(((i > g).sum() + 0.5 * (i == g).sum()) / (g.size * i.size))


def describe(values: list[float]) -> tuple[float, float, float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, q1, q2, q3


def identity_of(rec: Reconstructor, mode: str, image: np.ndarray) -> torch.Tensor:
    prepared = rec.prepare(image, rec.detect(image)[0])
    return rec.estimate([prepared], mode=mode).coefficients.id[0].cpu()  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, default=DEFAULT_LFW)
    ap.add_argument("--people", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="", help="comma list of rnet, fit, rnet+fit (default: what is available)")
    ap.add_argument("--cfp", nargs="?", type=Path, const=DEFAULT_CFP, default=None,
                    help="CFP frontal-vs-profile pairs instead of LFW (optionally the cfp folder)")
    ap.add_argument("--models-dir", type=Path, default=None, help="another models folder (e.g. a candidate R-Net)")
    args = ap.parse_args()
    from facerecon.config import Settings

    rec = Reconstructor(Settings(models_dir=args.models_dir) if args.models_dir else None)
    modes = [m for m in args.modes.split(",") if m] or (["rnet", "fit", "rnet+fit"] if rec.rnet else ["fit"])
    if rec.rnet is None and any(m.startswith("rnet") for m in modes):
        raise SystemExit("no R-Net is installed for this face model; use --modes fit")
    people = (cfp_people(args.cfp, args.people, args.seed) if args.cfp
              else people_with_sets(args.lfw, args.people, args.seed))
    mask = rec.model.face_mask.cpu()
    id_basis = rec.model.id_basis.cpu().view(rec.model.layout.id, -1, 3)[:, mask]  # (K, M, 3)
    t_start = time.perf_counter()
    for mode in modes:
        ids: list[tuple[str, torch.Tensor]] = []
        views: list[str] = []
        skipped = 0
        for name, photos in people.items():
            for p in photos:
                try:
                    ids.append((name, identity_of(rec, mode, load_image(p))))
                    views.append(p.parent.name)
                except FaceReconError:
                    skipped += 1
        dist: dict[str, dict[str, list[float]]] = {k: {"genuine": [], "impostor": []}
                                                   for k in ("id L2", "id cos", "shape mm")}
        for ((na, a), va), ((nb, b), vb) in itertools.combinations(zip(ids, views, strict=True), 2):
            if args.cfp and va == vb:
                continue  # CFP: frontal-vs-profile pairs only
            kind = "genuine" if na == nb else "impostor"
            dist["id L2"][kind].append(float((a - b).norm()))
            dist["id cos"][kind].append(float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0)))
            offset = torch.einsum("k,kmc->mc", a - b, id_basis)  # the neutral shapes differ by this
            dist["shape mm"][kind].append(float(offset.norm(dim=1).pow(2).mean().sqrt()) * MM_PER_MODEL_UNIT)
        n_people = len({n for n, _ in ids})
        print(f"\nmode {mode}: {len(ids)} photos of {n_people} people ({skipped} without a usable face skipped); "
              f"{len(dist['id L2']['genuine'])} genuine, {len(dist['id L2']['impostor'])} impostor pairs; "
              f"{time.perf_counter() - t_start:.0f} s so far")
        print(f"{'distance':<10}{'pairs':<10}{'mean':>8}{'sd':>8}{'q1':>8}{'median':>8}{'q3':>8}{'AUC':>8}"
              f"{'d prime':>9}")
        for metric, d in dist.items():
            if not d["genuine"] or not d["impostor"]:
                continue
            a_ = auc(d["genuine"], d["impostor"])
            mg, sg = describe(d["genuine"])[:2]
            mi, si = describe(d["impostor"])[:2]
            dprime = (mi - mg) / max(np.sqrt((sg**2 + si**2) / 2), 1e-12)
            for kind in ("genuine", "impostor"):
                m, s, q1, q2, q3 = describe(d[kind])
                tail = f"{a_:>8.3f}{dprime:>9.2f}" if kind == "genuine" else ""
                print(f"{metric if kind == 'genuine' else '':<10}{kind:<10}{m:>8.3f}{s:>8.3f}{q1:>8.3f}{q2:>8.3f}"
                      f"{q3:>8.3f}{tail}")


if __name__ == "__main__":
    main()

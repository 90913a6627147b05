"""The filter: every synthetic candidate gets every score, one decision and the reason for it.

A functional core on plain arrays (class indices, probabilities, embeddings, images), so any model
plugs in. Six filters, each in the scikit-learn shape (parameters in `__init__`, `fit(real)` learns
from real data only and returns self, learned state ends in `_`, `score(candidates)` gives an
N × len(columns) array, `accept(scores)` a boolean mask), registered by name:

==================  ===========  ==============================================================
filter              reason       rejects a candidate when
==================  ===========  ==============================================================
leakage             leak         it is a near-copy of a `val`/`test` image (embedding cosine ≥
                                 `leak_cosine`, pixel correlation ≥ `leak_pixel`, or the
                                 `leak_percentile` of real train's own nearest-other-real
                                 similarities (the default); or the same sha256). Always on, whatever `enabled` says; a human review
                                 cannot accept it either: an evaluation image in training
                                 invalidates every later measurement.
memorisation        memorised    it is a near-copy of a real training image (cosine ≥
                                 `memorisation_cosine` or pixel ≥ `memorisation_pixel`, or the
                                 `memorisation_percentile` of real train's own nearest-other-real
                                 similarities). A privacy matter for medical data.
fidelity            off_class    the critic's probability of the intended class < `fidelity_min`
                                 (or the `fidelity_percentile` of that probability on real val).
realism             unrealistic  its mean distance to the `realism_k` nearest real training images
                                 of its class (unit-length critic embeddings) is above the
                                 `realism_percentile` of the same distance for the real images
                                 themselves, leave-one-out; or, with `realism_method: lof`, the
                                 LocalOutlierFactor(novelty=True) score against that percentile.
duplicate           duplicate    it is a near-copy (`duplicate_cosine`/`duplicate_pixel`) of an
                                 image already in the accepted pool, or of a candidate earlier in
                                 id order that is itself kept.
informativeness     too_easy     the current model's probability of the intended class >
                                 `informativeness_max`: it already knows this image.
==================  ===========  ==============================================================

The rows above are the priority order: a candidate's `reason` is the first enabled filter it fails
(safety first, then quality, then redundancy); `failed` lists them all. The critic is a model
trained on real training data only and frozen (by default round 0's), never the model being
improved this round; the loop passes its probabilities and embeddings in. Pixel similarity is
defined in `vision_si.similarity`.

Choosing the thresholds. By default fidelity, memorisation and leakage are calibrated on the real
data (`fidelity_percentile` 10, `memorisation_percentile` 99, `leak_percentile` 99): with the fixed
values below, the efficacy benchmark's ELPV runs rejected all 600 candidates, because a weak round-0
critic gives the true class ≥ 0.5 to only 3–5 % of real val images and real ELPV cells are that
close to each other (benchmarks/results/efficacy_quick.md). Set a percentile to null for the fixed
value. The fixed near-copy values (cosine 0.98, pixel correlation 0.95 at 16 px)
call "near-copy" what differs from a real image by noise carrying at most ~10 % of its variance.
Some data sets hold real images that close to each other: at 16 px, 16 % of 800 ELPV cells have
another cell correlating ≥ 0.95 (3 % ≥ 0.98), and half of the 8×8 digits do. There, set
`memorisation_percentile` (e.g. 99: a candidate is memorised when it is closer to a training image
than 99 % of real training images are to their nearest other one) or raise the pixel thresholds;
`filter.json` reports both distributions (`closest_real`) so the choice can be checked.

`reviews` (id → accept|reject, from the run's `reviews.csv`) override decisions: a rejected
candidate a human accepts is accepted (its reason kept, `overridden` true), an accepted one a
human rejects is rejected with reason `human_review`; a `leak` is never overridden.

Modules: `base` (inputs, `CandidateFilter`, the registry), `quality` (fidelity, informativeness,
realism), `near_copy` (memorisation, leakage, duplicate), `decide` (`filter_candidates`), `result`
(`FilterResult`), `reviews` (`read_reviews`, `reviews_pending`). Importing this package
registers every filter; all public names are imported from here.
"""

# imported first so that FILTERS lists fidelity, informativeness, realism, then the near-copy filters
from vision_si.filter.quality import FidelityFilter, InformativenessFilter, RealismFilter  # isort: split

from vision_si.filter.base import (
    BASELINE_SAMPLES,
    FILTERS,
    HUMAN_REJECT,
    PRIORITY,
    REASONS,
    CandidateFilter,
    Candidates,
    ModelOutputs,
    RealReference,
    create_filter,
    register_filter,
)
from vision_si.filter.decide import QUANTILES, filter_candidates
from vision_si.filter.near_copy import DuplicateFilter, LeakageFilter, MemorisationFilter
from vision_si.filter.result import ACCEPTED, REJECTED, FilterResult
from vision_si.filter.reviews import read_reviews, reviews_pending

__all__ = [
    "PRIORITY", "REASONS", "HUMAN_REJECT", "QUANTILES", "BASELINE_SAMPLES",
    "Candidates", "RealReference", "FILTERS", "register_filter", "create_filter", "CandidateFilter",
    "FidelityFilter", "InformativenessFilter", "RealismFilter", "MemorisationFilter", "LeakageFilter",
    "DuplicateFilter", "FilterResult", "ACCEPTED", "REJECTED", "ModelOutputs", "read_reviews", "reviews_pending",
    "filter_candidates",
]
